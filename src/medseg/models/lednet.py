"""LEDNet (Wang et al., "LEDNet: A Lightweight Encoder-Decoder Network for Real-Time Semantic Segmentation", IEEE
ICIP 2019, arXiv:1905.02423), a lightweight baseline of Fovea-UNet's Table 3.

Built from the paper (Table 1, Fig. 1-2) and the authors' code (xiaoyufenfei/LEDNet, `train/lednet.py`):
- Downsampling unit: conv3x3 stride 2 (in -> out - in channels, bias) beside a 2x2 max-pooling, concatenated,
  BatchNorm (eps 1e-3), ReLU.
- SS-nbt unit (Fig. 1): the input split into two halves; left branch 3x1 -> ReLU -> 1x3 -> BN -> ReLU -> 3x1
  dilated -> ReLU -> 1x3 dilated -> BN, the right branch the same with 1x3 first; convs with bias; dropout; the
  halves concatenated, added to the input, ReLU, channel shuffle with 2 groups.
- Encoder (Table 1): downsampling to 32, 3 SS-nbt; downsampling to 64, 2 SS-nbt; downsampling to 128, SS-nbt with
  dilations 1, 2, 5, 9, 2, 5, 9, 17. Dropout 0.03 in stages 1-2, 0.3 in stage 3 (code).
- Decoder, attention pyramid network (Fig. 2): a pyramid of conv7x7 / 5x5 / 3x3 (stride 2, to one channel) and
  conv7x7 / 5x5 / 3x3 at each scale, merged upwards by bilinear upsampling and addition, multiplied with a 1x1
  conv of the features (to the classes) and added to a global-pooling branch; every conv is conv-BN-ReLU with bias;
  bilinear x8 (align_corners=True) to the input size.
Ours, where the code is fixed to Cityscapes: the upsamplings go to the size of the map they are added to (the code's
h // 4, h // 2, which agree with it at inputs that are multiples of 32), and the final one to the input size (the
code's fixed 512 x 1024). With one sigmoid output, the 1x1 branch and the global branch end without ReLU: the
code's conv-BN-ReLU ends make every score >= 0, a sigmoid probability >= 0.5 everywhere, and nothing could be
background. The encoder-only classifier of the code's pretraining stage is not built (the network trains end to end).

Parameters (3 in): 923,083 for the code's 20 Cityscapes labels, whose `Net(20)` counts 925,663 = ours + the
2,580 parameters of that unused encoder-only classifier (1x1 conv 128 -> 20); with its weights, our output equals
the code's at 512 x 1024 to the last bit (checked once). The paper gives "0.94M" in its comparison table:
the code is 1.5 % under it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

BN_EPS = 1e-3
STAGE3_DILATIONS = (1, 2, 5, 9, 2, 5, 9, 17)


class Downsampling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv(x)
        pooled = self.pool(x)
        if pooled.shape[-2:] != conv.shape[-2:]:  # odd sizes: the pooled map is one pixel short, pad it
            dh, dw = conv.shape[-2] - pooled.shape[-2], conv.shape[-1] - pooled.shape[-1]
            pooled = F.pad(pooled, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return torch.relu(self.bn(torch.cat([conv, pooled], dim=1)))


def factorised_branch(channels: int, dilation: int, vertical_first: bool) -> nn.Sequential:
    """Two factorised 3x3 convs (3x1 and 1x3, in the given order), the second pair dilated."""
    def pair(d: int) -> list[nn.Module]:
        vertical = nn.Conv2d(channels, channels, (3, 1), padding=(d, 0), dilation=(d, 1))
        horizontal = nn.Conv2d(channels, channels, (1, 3), padding=(0, d), dilation=(1, d))
        first, second = (vertical, horizontal) if vertical_first else (horizontal, vertical)
        return [first, nn.ReLU(inplace=True), second, nn.BatchNorm2d(channels, eps=BN_EPS)]

    return nn.Sequential(*pair(1), nn.ReLU(inplace=True), *pair(dilation))


class SSnbt(nn.Module):
    """Split-shuffle-non-bottleneck unit: split in halves, factorised convs, concat, residual, shuffle."""

    def __init__(self, channels: int, dropout: float, dilation: int):
        super().__init__()
        half = channels // 2
        self.left = factorised_branch(half, dilation, vertical_first=True)
        self.right = factorised_branch(half, dilation, vertical_first=False)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        out = torch.cat([self.dropout(self.left(left)), self.dropout(self.right(right))], dim=1)
        out = torch.relu(x + out)
        batch, channels, height, width = out.shape  # channel shuffle, 2 groups
        return out.view(batch, 2, channels // 2, height, width).transpose(1, 2).reshape(batch, channels, height, width)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2),
              nn.BatchNorm2d(out_channels, eps=BN_EPS)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class AttentionPyramid(nn.Module):
    """LEDNet's APN decoder (paper Fig. 2): pyramid attention times a 1x1 conv, plus a global branch."""

    def __init__(self, in_channels: int, out_channels: int, nonnegative: bool = True):
        super().__init__()
        self.global_branch = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                           conv_bn_relu(in_channels, out_channels, 1, relu=nonnegative))
        self.mid = conv_bn_relu(in_channels, out_channels, 1, relu=nonnegative)
        self.down1 = conv_bn_relu(in_channels, 1, 7, stride=2)
        self.down2 = conv_bn_relu(1, 1, 5, stride=2)
        self.down3 = nn.Sequential(conv_bn_relu(1, 1, 3, stride=2), conv_bn_relu(1, 1, 3))
        self.conv2 = conv_bn_relu(1, 1, 5)
        self.conv1 = conv_bn_relu(1, 1, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.down1(x)
        x2 = self.down2(x1)
        x3 = self.down3(x2)
        attention = self.conv2(x2) + _up(x3, x2)
        attention = self.conv1(x1) + _up(attention, x1)
        return _up(attention, x) * self.mid(x) + self.global_branch(x)  # the 1x1 global map broadcasts


def _up(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=True)


CARD = NetworkCard(
    paper="Wang et al., LEDNet: A Lightweight Encoder-Decoder Network for Real-Time Semantic Segmentation, IEEE ICIP "
          "2019",
    size_multiple=8, default_size=512, paper_num_classes=2)


@register_model("lednet", CARD)
class LEDNet(SegmentationNetwork):
    """LEDNet: split-shuffle-non-bottleneck encoder (1/8), attention pyramid network decoder."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        layers: list[nn.Module] = [Downsampling(in_channels, 32), *(SSnbt(32, 0.03, 1) for _ in range(3)),
                                   Downsampling(32, 64), *(SSnbt(64, 0.03, 1) for _ in range(2)),
                                   Downsampling(64, 128), *(SSnbt(128, 0.3, d) for d in STAGE3_DILATIONS)]
        self.encoder = nn.Sequential(*layers)
        self.head = AttentionPyramid(128, num_classes, nonnegative=num_classes > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _up(self.head(self.encoder(x)), x)
