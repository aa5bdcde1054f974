"""FocusNet (Kaul, Manandhar & Pears, "FocusNet: An attention-based Fully Convolutional Network for Medical
Image Segmentation", ISBI 2019), pinned down from the authors' Keras code (balwantraikekutte/focusnet-alpha,
unet.py, resnet.py, layers.py; the later chaitanya-kaul/TheFocusNetSeries for the stem width).

Two branches (paper Sec. 2, Fig. 1):
- branch A, the attention encoder-decoder: a conv-BN-LeakyReLU(0.3) stem, full pre-activation residual
  blocks with strided-conv downsampling (no max pooling), one dropout of 0.2 at the bottom, skip
  connections, and a decoder whose outputs at three depths (64, 128, 256 channels) are the attention;
- branch B, the gated SE-ResNet segmentation network: a 7x7 conv stem, then per level a pre-activation
  block, the first SE block whose output is multiplied by sigmoid(branch-A decoder output) ("the per-layer
  decoded output is passed through a sigmoid gating function and multiplied with the output of the first
  SE block"), a second SE block and a strided pre-activation block; a decoder of pre-activation blocks over
  skip connections and a 1x1 head (logits; the sigmoid belongs to prediction).

Filter bank volumes 32-64-128-256-512, input 256x256 (Sec. 3.2), 1 or 3 input channels: 18,933,497
parameters for 3 in / 1 out (pinned in tests/test_focusnet.py).

Where the paper is silent, the authors' Keras code decides:
- pre-activation block: [BN-ReLU] conv3x3(stride) - BN-ReLU - conv3x3, plus the input or a 1x1 conv
  (bias, no BN) when the shape changes, nothing after the sum; the first block of a level has no leading
  BN-ReLU; all convs have a bias;
- up-sampling: x2 nearest, 2x2 conv padded right/bottom ("same"), ReLU;
- Keras BatchNorm (momentum 0.99 = PyTorch 0.01, eps 1e-3) and he_normal (truncated normal, std
  sqrt(2 / fan_in)) for every conv and dense kernel, zero biases;
- the paper's "dropout 0.2 throughout" is one dropout after the bottom of branch A in the code;
  `dropout_everywhere=True` puts one after every pre-activation block of both encoders instead;
- the stem width is 32 (the later code; `stem_width=24` gives the earlier code's 18,925,569); the first
  strided block of branch A always widens to 32;
- the gate is channel-wise: sigmoid of the whole decoder feature, not of a one-channel map.
The Keras L2 on conv kernels is a training setting, `optim.kernel_l2: 1e-4` in the `focusnet` recipe;
`regularised_kernels()` names the kernels the code regularises and their factors (the attention stem 5x).
Not copied: the code's BatchNormalization subclass runs with training=True even at inference (batch
statistics always); medseg uses running statistics in evaluation, as any PyTorch network.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medseg.models.base import KernelRegularised, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

WIDTHS = (64, 128, 256, 512)  # branch B levels; branch A uses the first three
FIRST_WIDTH = 32  # the smallest filter volume: branch A's first strided block, branch B's last decoder level
KERAS_BN = {"momentum": 0.01, "eps": 1e-3}


def keras_batchnorm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, **KERAS_BN)


class PreActBlock(nn.Module):
    """Full pre-activation basic residual block (He et al. 2016, "Identity mappings"), keras-resnet form."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, first: bool = False):
        super().__init__()
        self.pre = nn.Identity() if first else nn.Sequential(keras_batchnorm(in_channels), nn.ReLU(inplace=False))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.mid = nn.Sequential(keras_batchnorm(out_channels), nn.ReLU(inplace=True))
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        same = in_channels == out_channels and stride == 1
        self.shortcut = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.mid(self.conv1(self.pre(x)))) + self.shortcut(x)


class SqueezeExcitation(nn.Module):
    """SE block, ratio 16: GAP, dense C -> C/16 (no bias), ReLU, dense -> C (no bias), sigmoid, re-weighting."""

    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        self.excite = nn.Sequential(nn.Linear(channels, channels // ratio, bias=False), nn.ReLU(inplace=True),
                                    nn.Linear(channels // ratio, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(x.mean(dim=(2, 3)))[:, :, None, None]


class KerasUpConv(nn.Sequential):
    """x2 nearest upsampling, 2x2 conv with Keras "same" padding (one row/column right and bottom), ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.ZeroPad2d((0, 1, 0, 1)),
                         nn.Conv2d(in_channels, out_channels, 2), nn.ReLU(inplace=True))


class FocusGate(nn.Module):
    """features * sigmoid(attention): branch A's decoder output gates branch B's first SE output."""

    def forward(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return features * torch.sigmoid(attention)


class UpLevel(nn.Module):
    """Decoder level: up-convolve the deeper feature, concatenate [skip, up], one pre-activation block."""

    def __init__(self, deep_channels: int, up_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = KerasUpConv(deep_channels, up_channels)
        self.block = PreActBlock(skip_channels + up_channels, out_channels, first=True)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.up(deep)], dim=1))


def _maybe_dropout(block: nn.Module, rate: float, enabled: bool) -> nn.Module:
    return nn.Sequential(block, nn.Dropout(rate)) if enabled else block


class AttentionBranch(nn.Module):
    """Branch A: returns the decoder outputs (a7, a6, a5) at full, 1/2 and 1/4 resolution (64, 128, 256 ch)."""

    def __init__(self, in_channels: int, stem_width: int, dropout: float, dropout_everywhere: bool):
        super().__init__()
        c1, c2, c3 = WIDTHS[:3]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False),
                                  keras_batchnorm(stem_width), nn.LeakyReLU(0.3))
        everywhere = dropout_everywhere
        self.encoder = nn.ModuleList([
            _maybe_dropout(PreActBlock(stem_width, FIRST_WIDTH, stride=2), dropout, everywhere),  # a1p
            _maybe_dropout(PreActBlock(FIRST_WIDTH, c1, first=True), dropout, everywhere),        # a2
            _maybe_dropout(PreActBlock(c1, c1, stride=2), dropout, everywhere),                  # a2p
            _maybe_dropout(PreActBlock(c1, c2, first=True), dropout, everywhere),                # a3
            _maybe_dropout(PreActBlock(c2, c2, stride=2), dropout, everywhere),                  # a3p
            # a4 (+ the code's dropout)
            nn.Sequential(PreActBlock(c2, c3, first=True), nn.Dropout(dropout)),
        ])
        self.decoder = nn.ModuleList([
            UpLevel(c3, c3, c2, c3),          # a5 = block(cat[a3, up(a4)]): 384 -> 256
            UpLevel(c3, c2, c1, c2),          # a6 = block(cat[a2, up(a5)]): 192 -> 128
            UpLevel(c2, c1, stem_width, c1),  # a7 = block(cat[a1, up(a6)]): 96 -> 64
        ])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a1 = self.stem(x)
        features = [a1]
        for block in self.encoder:
            features.append(block(features[-1]))
        a2, a3, a4 = features[2], features[4], features[6]
        a5 = self.decoder[0](a4, a3)
        a6 = self.decoder[1](a5, a2)
        a7 = self.decoder[2](a6, a1)
        return a7, a6, a5


class GatedLevel(nn.Module):
    """Branch B encoder level: pre-act block, SE, then for a gated level the branch-A gate and a second SE,
    then a strided pre-act block. The deepest level has no gate and one SE."""

    def __init__(self, in_channels: int, out_channels: int, gated: bool, dropout: float, dropout_everywhere: bool):
        super().__init__()
        self.block = _maybe_dropout(PreActBlock(in_channels, out_channels, first=True), dropout, dropout_everywhere)
        self.first_se = SqueezeExcitation(out_channels)
        self.gate = FocusGate() if gated else None
        self.second_se = SqueezeExcitation(out_channels) if gated else nn.Identity()
        self.down = _maybe_dropout(PreActBlock(out_channels, out_channels, stride=2), dropout, dropout_everywhere)

    def forward(self, x: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
        x = self.first_se(self.block(x))
        if self.gate is not None:
            x = self.second_se(self.gate(x, attention))
        return self.down(x)


CARD = NetworkCard(
    paper="Kaul, Manandhar & Pears, FocusNet: An attention-based Fully Convolutional Network for Medical Image "
          "Segmentation, ISBI 2019",
    size_multiple=16, default_size=256)


@register_model("focusnet", CARD)
class FocusNet(KernelRegularised, SegmentationNetwork):
    """FocusNet: an attention encoder-decoder whose decoder outputs gate the SE blocks of a pre-activation
    SE-ResNet encoder-decoder (strided-conv downsampling, 32-512 filters)."""

    groups = {"attention": ("attention",)}
    rest_group = "segmentation"

    def __init__(self, in_channels: int = 3, num_classes: int = 1, stem_width: int = 32, dropout: float = 0.2,
                 dropout_everywhere: bool = False):
        super().__init__()
        c1, c2, c3, c4 = WIDTHS
        self.attention = AttentionBranch(in_channels, stem_width, dropout, dropout_everywhere)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c1, 7, padding=3), keras_batchnorm(c1), nn.ReLU(inplace=True))
        self.encoder = nn.ModuleList(GatedLevel(i, o, gated, dropout, dropout_everywhere)
                                     for i, o, gated in ((c1, c1, True), (c1, c2, True), (c2, c3, True),
                                                         (c3, c4, False)))
        self.decoder = nn.ModuleList([
            UpLevel(c4, c3, c3, c3),   # d5 = block(cat[b3, up(b4)]): 512 -> 256
            UpLevel(c3, c2, c2, c2),   # d6: 256 -> 128
            UpLevel(c2, c1, c1, c1),   # d7: 128 -> 64
            UpLevel(c1, FIRST_WIDTH, c1, FIRST_WIDTH),   # d8 = block(cat[r, up(d7)]): 96 -> 32
        ])
        self.tail = nn.Sequential(PreActBlock(FIRST_WIDTH, 16, first=True), PreActBlock(16, 4, first=True))
        self.head = nn.Conv2d(4, num_classes, 1)
        self.apply(_keras_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.attention(x)  # (a7, a6, a5): 64, 128, 256 channels
        r = self.stem(x)
        skips = [r]
        for level, gate_input in zip(self.encoder, (*attention, None)):
            skips.append(level(skips[-1], gate_input))
        y = skips.pop()
        for level in self.decoder:
            y = level(y, skips.pop())
        return self.head(self.tail(y))

    def regularised_kernels(self) -> list[tuple[nn.Parameter, float]]:
        """The conv kernels the Keras code regularises, with their L2 factor relative to `optim.kernel_l2`:
        every residual-block conv and shortcut and the 7x7 stem (l2(1e-4) in resnet.py), and branch A's stem
        (l2(5e-4) in layers.py, so 5x); the up-convolutions and the 1x1 head have no regulariser."""
        kernels = [(self.attention.stem[0].weight, 5.0), (self.stem[0].weight, 1.0)]
        for block in (m for m in self.modules() if isinstance(m, PreActBlock)):
            kernels += [(block.conv1.weight, 1.0), (block.conv2.weight, 1.0)]
            if isinstance(block.shortcut, nn.Conv2d):
                kernels.append((block.shortcut.weight, 1.0))
        return kernels


# Keras divides the scale by the std of a unit normal truncated at +-2, so the drawn values keep std sqrt(2/n).
TRUNCATED_STD = 0.87962566103423978


def _keras_init(module: nn.Module) -> None:
    """Keras he_normal (normal truncated at 2 std, std sqrt(2 / fan_in) after truncation) for kernels, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        std = math.sqrt(2.0 / fan_in) / TRUNCATED_STD
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
