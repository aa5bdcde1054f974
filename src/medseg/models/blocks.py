"""Layers shared by several networks. A block used by two model files lives here, not in either."""

from __future__ import annotations

import torch
from torch import nn


def check_input_size(x: torch.Tensor, multiple: int) -> None:
    """Networks that pool k times need H and W divisible by 2^k; predict pads to this, callers must too."""
    if x.shape[-2] % multiple or x.shape[-1] % multiple:
        raise ValueError(f"input height and width must be multiples of {multiple}, got {tuple(x.shape[-2:])}")


def encode_levels(levels: nn.ModuleList, pool: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """U-Net encoder: each level's block on the pooled output of the previous one; every output is a skip."""
    skips = []
    for i, block in enumerate(levels):
        x = block(x if i == 0 else pool(x))
        skips.append(x)
    return skips


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


class UpConv(nn.Sequential):
    """x2 nearest upsampling, then a 3x3 conv-BN-ReLU (the "up_conv" of the Attention U-Net / R2U-Net
    reference implementations)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Upsample(scale_factor=2), ConvBNReLU(in_channels, out_channels, bias=True))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018, Eq. 1-2; ANU-Net Eq. 1-3).

    F = ReLU(BN(W_f f) + BN(W_g g)), alpha = sigmoid(BN(W_theta F)), output = f * alpha, with 1x1 convs
    (bias on) and one coefficient per pixel broadcast over the channels of f. `keep_coefficients` makes
    the gate remember its last alpha (detached) so that attention maps can be saved (ANU-Net Fig. 12).
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Conv2d(gate_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.skip = nn.Sequential(nn.Conv2d(skip_channels, inter_channels, 1), nn.BatchNorm2d(inter_channels))
        self.coefficient = nn.Sequential(nn.Conv2d(inter_channels, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.keep_coefficients = False
        self.last_coefficients: torch.Tensor | None = None

    def forward(self, gating: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        alpha = self.coefficient(torch.relu(self.gate(gating) + self.skip(skip)))
        if self.keep_coefficients:
            self.last_coefficients = alpha.detach()
        return skip * alpha
