"""ResUNet++ (Jha et al., "ResUNet++: An Advanced Architecture for Medical Image Segmentation", IEEE ISM 2019,
arXiv:1911.07067), a baseline of M2SNet's video-polyp table (arXiv:2303.10894, Table 2), pinned down from the paper
(Sec. III, Fig. 2) and the authors' code (DebeshJha/ResUNetPlusPlus: m_resunet.py, the Keras original, and
resunet++_pytorch.py).

- Encoder: a stem (3x3 conv-BN-ReLU-3x3 conv plus a 1x1 conv-BN shortcut) and three pre-activation residual
  blocks (BN-ReLU-3x3 conv (stride 2)-BN-ReLU-3x3 conv, 1x1 conv-BN shortcut), each followed by squeeze-and-
  excitation (reduction 8, no biases; timm's SEModule); widths 16-32-64-128.
- Bridge and output: ASPP as the code builds it: 3x3 convs with dilation 1, 6, 12, 18, each + BN (no activation),
  summed, then a 1x1 conv (256 channels at the bridge, 16 before the 1x1 output conv).
- Decoder: at each level an attention block (BN-ReLU-3x3 conv of the encoder feature, 2x2 max-pooled, plus
  BN-ReLU-3x3 conv of the decoder feature, then BN-ReLU-3x3 conv, multiplying the decoder feature), x2 nearest
  upsampling, concatenation with the encoder feature and a residual block (widths 128-64-32).
- Convolutions keep their biases (Keras' default in the original), the SE layers have none.

M2SNet's Table 2 lists ResUNet++ with an "R2-50" backbone; ResUNet++ has its own 4-level residual encoder (paper and
code) and its results there are marked as taken from other work, so the original network is built here.

Parameters (3 in, 1 out): 4,062,993 trainable, equal to the authors' resunet++_pytorch.py. The paper's "4.07M" is
Keras' total, which also counts BatchNorm's moving mean and variance: 4,062,993 + 7,392 = 4,070,385.
Inputs: any multiple of 8.
"""

from __future__ import annotations

import torch
from timm.layers import SEModule
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

WIDTHS = (16, 32, 64, 128, 256)
SE_REDUCTION = 8


def _bn_relu_conv(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(),
                         nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1))


def _squeeze_excitation(channels: int) -> SEModule:
    return SEModule(channels, rd_channels=channels // SE_REDUCTION, bias=False)


class ResidualBlock(nn.Module):
    """Pre-activation residual unit with a projection shortcut, then squeeze-and-excitation. `stem=True` is the
    first unit: conv-BN-ReLU-conv on the raw input (no pre-activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, stem: bool = False):
        super().__init__()
        if stem:
            self.body = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                                      nn.BatchNorm2d(out_channels), nn.ReLU(),
                                      nn.Conv2d(out_channels, out_channels, 3, padding=1))
        else:
            self.body = nn.Sequential(_bn_relu_conv(in_channels, out_channels, stride),
                                      _bn_relu_conv(out_channels, out_channels))
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                                      nn.BatchNorm2d(out_channels))
        self.excite = _squeeze_excitation(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.excite(self.body(x) + self.shortcut(x))


class SummedASPP(nn.Module):
    """ResUNet++'s ASPP: parallel dilated 3x3 conv + BN branches (rates 1, 6, 12, 18) summed, then a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...] = (1, 6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=r, dilation=r), nn.BatchNorm2d(out_channels))
            for r in rates)
        self.project = nn.Conv2d(out_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(sum(branch(x) for branch in self.branches))


class SkipAttention(nn.Module):
    """The decoder's attention block: encoder feature (pooled to the decoder's size) + decoder feature -> a
    feature-wise mask that multiplies the decoder feature."""

    def __init__(self, skip_channels: int, channels: int):
        super().__init__()
        self.skip = nn.Sequential(_bn_relu_conv(skip_channels, channels), nn.MaxPool2d(2))
        self.decoder = _bn_relu_conv(channels, channels)
        self.mask = _bn_relu_conv(channels, channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.mask(self.skip(skip) + self.decoder(x)) * x


class DecoderLevel(nn.Module):
    def __init__(self, skip_channels: int, in_channels: int, out_channels: int):
        super().__init__()
        self.attention = SkipAttention(skip_channels, in_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.block = ResidualBlock(in_channels + skip_channels, out_channels)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.upsample(self.attention(skip, x)), skip], dim=1))


CARD = NetworkCard(
    paper="Jha et al., ResUNet++: An Advanced Architecture for Medical Image Segmentation, IEEE ISM 2019",
    size_multiple=8, default_size=256)


@register_model("resunetpp", CARD)
class ResUNetPlusPlus(SegmentationNetwork):
    """ResUNet++: residual U-Net with squeeze-excitation, ASPP bridge and output, attention on the skips."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        w = WIDTHS
        self.encoder = nn.ModuleList([ResidualBlock(in_channels, w[0], stem=True), ResidualBlock(w[0], w[1], 2),
                                      ResidualBlock(w[1], w[2], 2), ResidualBlock(w[2], w[3], 2)])
        self.bridge = SummedASPP(w[3], w[4])
        self.decoder = nn.ModuleList([DecoderLevel(w[2], w[4], w[3]), DecoderLevel(w[1], w[3], w[2]),
                                      DecoderLevel(w[0], w[2], w[1])])
        self.output_aspp = SummedASPP(w[1], w[0])
        self.head = nn.Conv2d(w[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = self.bridge(skips.pop())
        for level in self.decoder:
            x = level(skips.pop(), x)
        return self.head(self.output_aspp(x))
