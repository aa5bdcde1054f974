"""U-Net (Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015, arXiv:1505.04597), the baseline all five seed papers compare against.

Paper-faithful: four 2x2 max-pool downsamplings, two 3x3 convolutions per level, channel widths
64-128-256-512-1024, 2x2 up-convolutions (transposed convs) that halve the channels, concatenation with
the encoder feature of the same level, and a 1x1 output convolution (Sec. 2, Fig. 1).

Choices where the paper differs from today's common form (all as in the widely used reference
re-implementations, so that the 31,037,633-parameter count for 3 in / 1 out holds):
- "same" padding instead of unpadded convs, so the output has the input's size and no overlap-tile
  cropping is needed (the model contract: logits at input size);
- BatchNorm after every conv (the paper predates BN); the convs before BN have no bias;
- `base_channels` (default 64 as in the paper) scales all widths; the demo uses a narrower U-Net.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.blocks import DoubleConv, encode_levels
from medseg.models.registry import register_model

CARD = NetworkCard(
    paper="Ronneberger, Fischer & Brox, U-Net: Convolutional Networks for Biomedical Image Segmentation, MICCAI 2015",
    size_multiple=16, default_size=256)


@register_model("unet", CARD)
class UNet(SegmentationNetwork):
    """U-Net, the classic encoder-decoder with skip connections (64-1024 channels, transposed-conv up)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, base_channels: int = 64):
        super().__init__()
        widths = [base_channels * 2**i for i in range(5)]
        self.encoder = nn.ModuleList([DoubleConv(in_channels, widths[0])])
        self.encoder.extend(DoubleConv(widths[i], widths[i + 1]) for i in range(4))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in reversed(range(4)))
        self.decoder = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = encode_levels(self.encoder, self.pool, x)
        x = skips.pop()
        for up, block in zip(self.upsample, self.decoder):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)
