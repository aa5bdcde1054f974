"""CentroidNetV2 (Dijkstra, van de Loosdrecht, Atsma, Schomaker & Wiering, "CentroidNetV2: A hybrid deep neural
network for small-object segmentation and counting", Neurocomputing 423, 2021), a baseline of STS-Net's Table 1
(Sci. Rep. 2025: 31.03M parameters), pinned down from the authors' code (kdijkstra13/OpenCentroidNetV2:
centroidnet/centroidnet_core.py, centroidnet/backbones/unet.py, train.py, config.py).

- Backbone (code `CentroidNetV2` -> `UNet(num_classes + 4, depth=5, start_filts=64)`): a U-Net WITHOUT batch
  normalisation: per level two 3x3 convs with bias and ReLU, widths 64-1024, 2x2 max pooling, 2x2 transposed-conv
  up-sampling that halves the channels, concatenation (up first, skip second), and a 1x1 output conv. Weights start
  Xavier-normal with zero biases (code `weight_init`, applied to Conv2d only; transposed convs keep PyTorch's
  default).
- Output (code): `num_classes + 4` channels: 2 centroid-vector and 2 border-vector channels (each pixel's offset to
  its object's centroid / nearest border, divided by `max_dist`), then the class logits (background first, softmax).
  `forward` returns the class logits, the segmentation medseg trains and scores; `vector_fields(x)` returns the
  four vector channels for the counting use of the network.
- Loss (code `CentroidLossV2`): the mean Euclidean error of each vector field plus softmax cross-entropy of the
  logits. Ours: medseg's engine gives a loss the network's output and the mask only, so the recipe trains the
  cross-entropy term; the vector terms need each pixel's instance (the code derives the targets from annotated
  ellipses) and are not trained by `medseg train`. The 4 vector channels are 4 x 65 = 260 of the 31.03M
  parameters, kept so the network and its count are the code's.

Parameters (3 in, num_classes 2, i.e. 6 output channels): 31,032,070, the reference code's count; the STS-Net
table's 31.03M. Inputs: any multiple of 16.
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

VECTOR_CHANNELS = 4  # centroid (dy, dx) and border (dy, dx) vectors, in the code's order before the logits
DEPTH = 5

CARD = NetworkCard(
    paper="Dijkstra, van de Loosdrecht, Atsma, Schomaker & Wiering, CentroidNetV2: A hybrid deep neural network "
          "for small-object segmentation and counting, Neurocomputing 2021",
    size_multiple=2 ** (DEPTH - 1), default_size=256, paper_num_classes=2)


class PlainDoubleConv(nn.Sequential):
    """Two 3x3 convs with bias, each followed by ReLU (no normalisation, as the code)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


@register_model("centroidnet_v2", CARD)
class CentroidNetV2(SegmentationNetwork):
    """CentroidNetV2: a plain (no BN) U-Net 64-1024 whose head adds centroid and border vector fields to the logits."""

    groups = {"encoder": ("encoder",), "head": ("head",)}

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base_channels: int = 64):
        super().__init__()
        widths = [base_channels * 2 ** i for i in range(DEPTH)]
        self.num_classes = num_classes
        self.encoder = nn.ModuleList(PlainDoubleConv(in_channels if i == 0 else widths[i - 1], widths[i])
                                     for i in range(DEPTH))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in reversed(range(DEPTH - 1)))
        self.decoder = nn.ModuleList(PlainDoubleConv(2 * widths[i], widths[i]) for i in reversed(range(DEPTH - 1)))
        self.head = nn.Conv2d(widths[0], VECTOR_CHANNELS + num_classes, 1)
        for module in self.modules():  # the code initialises its Conv2d layers only
            if type(module) is nn.Conv2d:
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4 + num_classes, H, W): the code's output, vector fields first."""
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.decoder):
            x = block(torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)

    def vector_fields(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4, H, W): centroid then border vectors, in units of the code's `max_dist`."""
        return self.all_outputs(x)[:, :VECTOR_CHANNELS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_outputs(x)[:, VECTOR_CHANNELS:]
