"""SK-U-Net (Byra et al., "Breast mass segmentation in ultrasound with selective kernel U-Net convolutional neural
network", Biomedical Signal Processing and Control 61, 2020), a baseline of M2SNet's breast-ultrasound table (seed
001, Table 4, "SKs"), pinned down from the authors' Keras code (mbyr/bus_seg: seg_lib.py `selective_unet` with its
defaults, the network models/list of models.txt names).

- Selective kernel unit (code `selective_layer`): two branches on the same input, a 3x3 conv with dilation 2 and a
  plain 3x3 conv (both with bias, then BN and ReLU); their sum is average-pooled to a vector, a dense layer to C/2
  (compression 0.5) + BN + ReLU and a dense layer to C give a sigmoid weight a per channel; the output is
  a * dilated + (1 - a) * plain, i.e. the unit selects its receptive field per channel.
- U-Net layout (code): two selective units per level, 16-32-64-128 channels at 1..1/8 and 256 at the 1/16 bottom,
  2x2 max pooling; the decoder upsamples with a 2x2 stride-2 transposed conv (with bias) to the level's width,
  concatenates the skip and applies two selective units (the code's default `half_net=False`, no attention gates,
  no dropout).
- Head: 1x1 conv to one sigmoid map (code); `num_classes` > 1 gives a softmax head instead (ours).

The code's default input is one gray channel at 224 x 224; medseg's `in_channels` chooses it.

Parameters (1 in, 1 out): 3,934,977, the trainable weights of the code's Keras layers (Conv2D / Dense weights and
biases, BatchNormalization gamma and beta); the paper's count is not in our sources. Inputs: any multiple of 16;
training batches need 2+ images (the selection's BatchNorm1d normalises over the batch, as Keras' BN on Dense does).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

WIDTHS = (16, 32, 64, 128, 256)  # code: filters=16, doubled at each of the four poolings


class SelectiveKernel(nn.Module):
    """Two receptive fields (3x3 dilated 2, 3x3), mixed per channel by a squeeze-excitation-style sigmoid weight."""

    def __init__(self, in_channels: int, out_channels: int, compression: float = 0.5):
        super().__init__()
        self.dilated = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=2, dilation=2),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.plain = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                                   nn.ReLU(inplace=True))
        hidden = int(out_channels * compression)
        self.select = nn.Sequential(nn.Linear(out_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                    nn.Linear(hidden, out_channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dilated, plain = self.dilated(x), self.plain(x)
        weight = self.select((dilated + plain).mean(dim=(2, 3)))[:, :, None, None]
        return dilated * weight + plain * (1 - weight)


class SelectiveStage(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(SelectiveKernel(in_channels, out_channels), SelectiveKernel(out_channels, out_channels))


CARD = NetworkCard(paper="Byra et al., Breast mass segmentation in ultrasound with selective kernel U-Net "
                         "convolutional neural network, BSPC 2020", size_multiple=16, default_size=224)


@register_model("skunet", CARD)
class SKUNet(SegmentationNetwork):
    """SK-U-Net: a 16-256 channel U-Net whose every conv is a selective kernel unit."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1):
        super().__init__()
        self.encoder = nn.ModuleList(SelectiveStage(i, o) for i, o in zip((in_channels, *WIDTHS[:-2]), WIDTHS[:-1]))
        self.bottom = SelectiveStage(WIDTHS[-2], WIDTHS[-1])
        self.pool = nn.MaxPool2d(2)
        rising = list(reversed(WIDTHS))  # 256, 128, 64, 32, 16
        self.up = nn.ModuleList(nn.ConvTranspose2d(i, o, 2, stride=2) for i, o in zip(rising, rising[1:]))
        self.decoder = nn.ModuleList(SelectiveStage(2 * o, o) for o in rising[1:])
        self.head = nn.Conv2d(WIDTHS[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottom(x)
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips)):
            x = stage(torch.cat([up(x), skip], dim=1))
        return self.head(x)
