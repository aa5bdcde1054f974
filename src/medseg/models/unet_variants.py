"""Attention U-Net, R2U-Net, Attention R2U-Net, ResU-Net and RU-Net: the U-Net variants ANU-Net (Computers &
Graphics 2020, Sec. 4.3, Tables 2-5), STS-Net (Table 1) and FocusNet (ISBI 2019, Table 1) compare against.

- Attention U-Net: Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018.
- R2U-Net: Alom et al., "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for
  Medical Image Segmentation", arXiv:1802.06955 (2018); the recurrent convolutional layer of Sec. 3.1
  applies one 3x3 conv t + 1 times, each time to the input plus the previous output; a 1x1 conv matches
  the channels and the block is residual.
- ResU-Net and RU-Net: the R2U-Net paper's own ablations (its Fig. 4 (c) and (b); FocusNet's Table 1 copies their
  rows from it): the residual unit without recurrence (two 3x3 conv-BN-ReLU plus the identity) and the recurrent
  unit without the residual sum. Ours: both keep R2U-Net's 1x1 projection to the level's width, so the four
  variants differ only in the unit and have the same parameter count, as the paper says they do ("same number
  of network parameters"). The paper's widths for those experiments are not in its text we could read, so the
  widths are the skeleton's below; the STS-Net Table 1 count of R2U-Net (39.09M) is this skeleton's.

All three share one skeleton, the common reference form of these networks (ours): five
encoder levels of 64-1024 channels with 2x2 max pooling, decoder upsampling by x2 nearest + 3x3
conv-BN-ReLU ("up-conv"), concatenation [skip, up], a 1x1 head. With `attention`, every skip passes an
additive attention gate gated by the up-conv output, with F_int = F / 2. Convs keep their bias, as in
that form. Parameters (3 in, 1 out): attention_unet 34,878,573; r2unet (t = 2) 39,091,393 (STS-Net Table 1:
39.09M); r2attunet 39,442,925 (pinned in tests/test_unet_variants.py); resunet and runet 39,091,393.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.base import Gated, NetworkCard, SegmentationNetwork
from medseg.models.blocks import AttentionGate, ConvBNReLU, DoubleConv, UpConv, encode_levels
from medseg.models.registry import register_model

WIDTHS = (64, 128, 256, 512, 1024)


class RecurrentConv(nn.Module):
    """One 3x3 conv-BN-ReLU applied t + 1 times: y = f(x), then y = f(x + y) t times (shared weights)."""

    def __init__(self, channels: int, steps: int):
        super().__init__()
        self.conv = ConvBNReLU(channels, channels, bias=True)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for _ in range(self.steps):
            y = self.conv(x + y)
        return y


class RecurrentResidualBlock(nn.Module):
    """RRCNN block: 1x1 conv to the output width, two recurrent convs (or, with `recurrent=False`, two plain
    3x3 conv-BN-ReLU: the residual unit), and the residual sum unless `residual=False` (the recurrent unit)."""

    def __init__(self, in_channels: int, out_channels: int, steps: int = 2, recurrent: bool = True,
                 residual: bool = True):
        super().__init__()
        self.project = nn.Conv2d(in_channels, out_channels, 1)
        self.body = (nn.Sequential(RecurrentConv(out_channels, steps), RecurrentConv(out_channels, steps))
                     if recurrent else DoubleConv(out_channels, out_channels, bias=True))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x + self.body(x) if self.residual else self.body(x)


class UNetVariant(Gated, SegmentationNetwork):
    """U-Net skeleton with a choice of level block (double conv or recurrent residual) and optional gates."""

    def __init__(self, in_channels: int, num_classes: int, recurrent: bool, attention: bool, steps: int = 2,
                 residual: bool | None = None):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Module:
            if residual is None:  # the two published forms: plain double conv, or the recurrent residual block
                return RecurrentResidualBlock(cin, cout, steps) if recurrent else DoubleConv(cin, cout, bias=True)
            return RecurrentResidualBlock(cin, cout, steps, recurrent=recurrent, residual=residual)

        self.encoder = nn.ModuleList([block(in_channels, WIDTHS[0])])
        self.encoder.extend(block(WIDTHS[i], WIDTHS[i + 1]) for i in range(4))
        self.pool = nn.MaxPool2d(2)
        levels = list(reversed(range(4)))
        self.upsample = nn.ModuleList(UpConv(WIDTHS[i + 1], WIDTHS[i]) for i in levels)
        self.gates = (nn.ModuleList(AttentionGate(WIDTHS[i], WIDTHS[i], WIDTHS[i] // 2) for i in levels)
                      if attention else None)
        self.decoder = nn.ModuleList(block(2 * WIDTHS[i], WIDTHS[i]) for i in levels)
        self.head = nn.Conv2d(WIDTHS[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = encode_levels(self.encoder, self.pool, x)
        x = skips.pop()
        for i, (up, block) in enumerate(zip(self.upsample, self.decoder)):
            x = up(x)
            skip = skips.pop()
            if self.gates is not None:
                skip = self.gates[i](x, skip)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)

    def first_layer_gates(self) -> dict[str, AttentionGate]:
        return {"gate_level0": self.gates[-1]} if self.gates is not None else {}


ATTENTION_UNET = NetworkCard(
    paper="Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018",
    size_multiple=16, default_size=256)
R2UNET = NetworkCard(
    paper="Alom et al., Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image "
          "Segmentation, arXiv:1802.06955, 2018",
    size_multiple=16, default_size=256)


@register_model("attention_unet", ATTENTION_UNET)
class AttentionUNet(UNetVariant):
    """Attention U-Net: U-Net with additive attention gates on every skip (F_int = F / 2)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__(in_channels, num_classes, recurrent=False, attention=True)


@register_model("r2unet", R2UNET, attention=False)
@register_model("r2attunet", R2UNET, attention=True)
class R2UNet(UNetVariant):
    """R2U-Net: recurrent residual conv blocks (t = 2) in a U-Net; `r2attunet` adds attention gates."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, attention: bool = False, steps: int = 2):
        super().__init__(in_channels, num_classes, recurrent=True, attention=attention, steps=steps)


@register_model("resunet", R2UNET)
class ResUNet(UNetVariant):
    """ResU-Net (the R2U-Net paper's baseline): residual units of two 3x3 convs in the same U-Net."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__(in_channels, num_classes, recurrent=False, attention=False, residual=True)


@register_model("runet", R2UNET)
class RUNet(UNetVariant):
    """RU-Net (the R2U-Net paper): recurrent conv units (t = 2) without the residual sum, in the same U-Net."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, steps: int = 2):
        super().__init__(in_channels, num_classes, recurrent=True, attention=False, steps=steps, residual=False)
