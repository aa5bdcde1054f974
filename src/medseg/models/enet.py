"""ENet (Paszke, Chaurasia, Kim & Culurciello, "ENet: A Deep Neural Network Architecture for Real-Time Semantic
Segmentation", arXiv:1606.02147, 2016), a lightweight baseline of Fovea-UNet's Table 3.

Built from the paper (Table 1, Sec. 3, 4) and the authors' Torch code (e-lab/ENet-training,
`train/models/encoder.lua`, `decoder.lua`), which settles what the paper leaves open:
- Initial block: conv3x3 stride 2 (13 filters, bias) beside a 2x2 max-pooling, concatenated (16 channels),
  BatchNorm, PReLU.
- Bottleneck (Fig. 2b): main branch 1x1 projection (2x2 stride 2 when downsampling; no bias) -> BN -> PReLU ->
  the middle conv (3x3 regular, 3x3 dilated, or 1x5 (no bias) then 5x1 asymmetric; with bias) -> BN -> PReLU ->
  1x1 expansion (no bias) -> BN -> spatial dropout (0.01 in stage 1, 0.1 after); the other branch is the identity,
  max-pooled and zero-padded in channels when downsampling; sum, PReLU. Projection ratio 4; PReLU with one
  weight per channel (Torch's nn.PReLU(n)); BN eps 1e-3.
- Stages 2 and 3: regular, dilated 2, asymmetric 5, dilated 4, regular, dilated 8, asymmetric 5, dilated 16
  (stage 2 after its downsampling bottleneck).
- Decoder (stages 4, 5): ReLU instead of PReLU, no dropout; an upsampling bottleneck has a 3x3 transposed conv
  (stride 2) in its main branch and a 1x1 conv (no bias) -> BN -> max-unpooling with the indices of the matching
  encoder downsampling in the other branch; the last layer is a 2x2 transposed conv (stride 2) to the classes.

Parameters (3 in): 363,856 with CamVid's 12 classes, 364,376 with the Torch code's 20 Cityscapes labels, 363,141
for one binary output. The paper's Table 3 gives "0.37M", which the authors' layers do not reach: 1.7 % under
with 12 classes, 1.5 % with 20 (0.8 % with the encoder-only classifier of 20 classes, 2,580 more, counted too;
the paper does not say what it counted).
(The popular PyTorch port davidtvs/PyTorch-ENet has 350,652 for 12 classes: one PReLU weight per layer and a
3x3 final transposed conv; the Torch code is the authors'.)
Ours: the encoder-only pretraining stage of the Torch code (a 1x1 classifier on stage 3, trained first) is
not built; the network trains end to end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

BN_EPS = 1e-3  # the Torch code's SpatialBatchNormalization(n, 1e-3)
PROJECTION = 4  # internal = output / 4
# stage 2 / 3 body after the downsampling: ("regular" | "dilated" | "asymmetric", dilation or kernel size)
STAGE_BODY = (("regular", 1), ("dilated", 2), ("asymmetric", 5), ("dilated", 4), ("regular", 1), ("dilated", 8),
              ("asymmetric", 5), ("dilated", 16))


def conv_bn(in_channels: int, out_channels: int, kernel, stride=1, padding=0, dilation=1, bias=False) -> list:
    return [nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, bias=bias),
            nn.BatchNorm2d(out_channels, eps=BN_EPS)]


class InitialBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 16):
        super().__init__()
        if in_channels >= out_channels:
            raise MedsegError(f"ENet's initial block concatenates a conv with the max-pooled input into {out_channels} "
                              f"channels, so it takes at most {out_channels - 1} input channels, got {in_channels}")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


class EncoderBottleneck(nn.Module):
    """ENet's encoder bottleneck (regular, dilated, asymmetric or downsampling); returns pooling indices when
    downsampling."""

    def __init__(self, in_channels: int, out_channels: int, kind: str = "regular", size: int = 1,
                 downsample: bool = False, dropout: float = 0.1):
        super().__init__()
        internal, stride = out_channels // PROJECTION, 2 if downsample else 1
        if kind == "asymmetric":
            # Torch's SpatialConvolution(n, n, kW=5, kH=1) first: a 1x5 kernel, then 5x1
            middle = [nn.Conv2d(internal, internal, (1, size), padding=(0, (size - 1) // 2), bias=False),
                      nn.Conv2d(internal, internal, (size, 1), padding=((size - 1) // 2, 0))]
        else:  # regular (size 1) or dilated (size = dilation)
            middle = [nn.Conv2d(internal, internal, 3, padding=size, dilation=size)]
        self.main = nn.Sequential(*conv_bn(in_channels, internal, stride, stride), nn.PReLU(internal),
                                  *middle, nn.BatchNorm2d(internal, eps=BN_EPS), nn.PReLU(internal),
                                  *conv_bn(internal, out_channels, 1), nn.Dropout2d(dropout))
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True) if downsample else None
        self.pad_channels = out_channels - in_channels
        self.act = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shortcut, indices = (x, None) if self.pool is None else self.pool(x)
        if self.pad_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
        return self.act(self.main(x) + shortcut), indices


class DecoderBottleneck(nn.Module):
    """ENet's decoder bottleneck: regular, or upsampling (transposed conv; 1x1 conv + max-unpooling beside it)."""

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False):
        super().__init__()
        internal = out_channels // PROJECTION
        middle = (nn.ConvTranspose2d(internal, internal, 3, stride=2, padding=1, output_padding=1) if upsample
                  else nn.Conv2d(internal, internal, 3, padding=1))
        self.main = nn.Sequential(*conv_bn(in_channels, internal, 1), nn.ReLU(inplace=True), middle,
                                  nn.BatchNorm2d(internal, eps=BN_EPS), nn.ReLU(inplace=True),
                                  *conv_bn(internal, out_channels, 1))
        self.project = (nn.Sequential(*conv_bn(in_channels, out_channels, 1))
                        if upsample or in_channels != out_channels else nn.Identity())
        self.unpool = nn.MaxUnpool2d(2, stride=2) if upsample else None

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        shortcut = self.project(x)
        main = self.main(x)
        if self.unpool is not None:
            shortcut = self.unpool(shortcut, indices, output_size=main.shape[-2:])
        return torch.relu(main + shortcut)


CARD = NetworkCard(
    paper="Paszke, Chaurasia, Kim & Culurciello, ENet: A Deep Neural Network Architecture for Real-Time Semantic "
          "Segmentation, arXiv:1606.02147, 2016",
    size_multiple=8, default_size=512, paper_num_classes=2)


@register_model("enet", CARD)
class ENet(SegmentationNetwork):
    """ENet: early-downsampling bottleneck encoder (dilated and asymmetric convs), small unpooling decoder."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        stage1 = [EncoderBottleneck(16, 64, downsample=True, dropout=0.01)]
        stage1 += [EncoderBottleneck(64, 64, dropout=0.01) for _ in range(4)]
        stage2 = [EncoderBottleneck(64, 128, downsample=True)]
        stage2 += [EncoderBottleneck(128, 128, kind, size) for kind, size in STAGE_BODY]
        stage3 = [EncoderBottleneck(128, 128, kind, size) for kind, size in STAGE_BODY]
        self.encoder = nn.ModuleList([InitialBlock(in_channels, 16), *stage1, *stage2, *stage3])
        self.decoder = nn.ModuleList([DecoderBottleneck(128, 64, upsample=True), DecoderBottleneck(64, 64),
                                      DecoderBottleneck(64, 64), DecoderBottleneck(64, 16, upsample=True),
                                      DecoderBottleneck(16, 16)])
        self.head = nn.ConvTranspose2d(16, num_classes, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder[0](x)
        indices = []  # of the two downsampling bottlenecks, shallowest first
        for block in self.encoder[1:]:
            x, pooled = block(x)
            if pooled is not None:
                indices.append(pooled)
        for block in self.decoder:
            x = block(x, indices.pop()) if block.unpool is not None else block(x)
        return self.head(x)
