"""Layers shared by several networks. A block used by two model files lives here, not in either."""

from __future__ import annotations

from torch import nn


class ConvBNReLU(nn.Sequential):
    """conv(k) -> BatchNorm -> ReLU. The conv has no bias by default: BN's shift makes it redundant."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = False):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two 3x3 conv-BN-ReLU layers: the U-Net level block (Ronneberger et al. 2015, Fig. 1)."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None, bias: bool = False):
        mid = mid_channels or out_channels
        super().__init__(ConvBNReLU(in_channels, mid, bias=bias), ConvBNReLU(mid, out_channels, bias=bias))
