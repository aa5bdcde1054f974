"""Triple U-Net (Zhao et al., "Triple U-net: Hematoxylin-aware nuclei segmentation with progressive dense feature
aggregation", Medical Image Analysis 65, 101786, 2020), a baseline of Fovea-UNet's Table 2.

Built from the paper (Sec. 3, Fig. 2-3) and the authors' code (Bingchao-Zhao/Triple_U-net, `source/model.py`,
`utils.py` `separate_stain`, `data.py`):
- Hematoxylin image: colour deconvolution of the RGB image with the fixed stain vectors H (0.650, 0.704, 0.286),
  E (0.072, 0.990, 0.105), residual (0.268, 0.570, 0.776), each normalised; the H channel back in optical
  density -> intensity, clipped at 255, repeated to three channels. Computed inside the network from its input,
  which must therefore be the RGB image scaled to [0, 1] (the code's x / 255: the recipe's `normalize: none`).
- RGB branch and H branch: each a U-Net (64-128-256-512, two conv3x3-BN-ReLU per level, no bias; downsampling by
  a 1x1 conv-BN-ReLU of stride 2 then a 1x1 conv-BN-ReLU; upsampling by bilinear x2 (align_corners=True) and a
  1x1 conv-BN-ReLU, concatenation with the skip, a 1x1 conv-BN-ReLU, two conv3x3-BN-ReLU) with a 1x1 head.
- Segmentation branch: progressive dense feature aggregation (PDFA, Fig. 3) at every level: a 5x5 conv-BN-ReLU
  on the first feature, then on the concatenation of everything it produced with the next feature, and so on;
  two conv3x3-BN-ReLU at the end. Down: PDFA of (previous level downsampled, H, RGB encoder features); up: PDFA
  of (previous level resized (nearest) + conv3x3-BN-ReLU, the segmentation encoder feature, H, RGB decoder
  features); a 1x1 head.
- Outputs: training mode returns [nuclei, H-branch, RGB-branch] logits (the code applies sigmoids and its loss
  to probabilities); eval mode the nuclei map.
Ours: the deconvolution keeps real values where the code rounds to uint8. The code supervises the H branch with
nuclei contours (a second label set); medseg's deep supervision gives every output the mask (see the recipe).
RGB input only (in_channels 3): the stain separation is defined on RGB H&E images.

Parameters (3 in, 1 out): 96,833,984, exactly the code's `net()`. The paper prints no count.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.blocks import ConvBNReLU, DoubleConv
from medseg.models.registry import register_model

WIDTHS = (64, 128, 256, 512)
STAINS = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))  # H, E, residual (code utils.py)


def hematoxylin_image(rgb: torch.Tensor, inverse_stains: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> the H channel of the code's colour deconvolution, in [0, 1], 3 channels."""
    log255 = math.log(255.0)
    density = -255.0 * torch.log((rgb * 255.0 + 1.0) / 255.0) / log255  # optical density, 0..255 scale
    stains = torch.einsum("bchw,cs->bshw", density, inverse_stains)
    hematoxylin = torch.exp((255.0 - stains[:, :1]) * log255 / 255.0).clamp(max=255.0) / 255.0
    return hematoxylin.expand(-1, 3, -1, -1)


class Downsample(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, out_channels, 1, stride=2), ConvBNReLU(out_channels, out_channels, 1))


class UpStep(nn.Module):
    """Bilinear x2 + 1x1 conv, concatenation with the skip, 1x1 conv, two conv3x3 (the code's unet_up_sample)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = ConvBNReLU(in_channels, out_channels, 1)
        self.merge = ConvBNReLU(2 * out_channels, out_channels, 1)
        self.block = DoubleConv(out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
        return self.block(self.merge(torch.cat([skip, x], dim=1)))


class BranchUNet(nn.Module):
    """The RGB or H branch: a U-Net returning its encoder features, decoder features and head logits."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.encoder = nn.ModuleList([DoubleConv(in_channels, WIDTHS[0])])
        self.encoder.extend(DoubleConv(WIDTHS[i], WIDTHS[i + 1]) for i in range(3))
        self.down = nn.ModuleList(Downsample(w, w) for w in WIDTHS[:3])
        self.decoder = nn.ModuleList(UpStep(WIDTHS[i + 1], WIDTHS[i]) for i in reversed(range(3)))
        self.head = nn.Conv2d(WIDTHS[0], num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        encoded = [self.encoder[0](x)]
        for down, block in zip(self.down, self.encoder[1:]):
            encoded.append(block(down(encoded[-1])))
        decoded, y = [], encoded[-1]
        for step, skip in zip(self.decoder, reversed(encoded[:-1])):
            y = step(y, skip)
            decoded.append(y)
        return encoded, decoded, self.head(y)


class PDFA(nn.Module):
    """Progressive dense feature aggregation over `fused` features of `channels` channels each."""

    def __init__(self, channels: int, fused: int):
        super().__init__()
        self.steps = nn.ModuleList(ConvBNReLU(channels * (i + 1), channels, 5) for i in range(fused))
        self.out = nn.Sequential(ConvBNReLU(channels, channels), ConvBNReLU(channels, channels))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        produced = [self.steps[0](features[0])]
        for step, feature in zip(self.steps[1:], features[1:]):
            produced.append(step(torch.cat([*produced, feature], dim=1)))
        return self.out(produced[-1])


CARD = NetworkCard(
    paper="Zhao et al., Triple U-net: Hematoxylin-aware nuclei segmentation with progressive dense feature "
          "aggregation, Medical Image Analysis 2020",
    size_multiple=8, default_size=256, head="head")


@register_model("triple_unet", CARD)
class TripleUNet(SegmentationNetwork):
    """Triple U-Net: RGB and hematoxylin U-Nets feeding a segmentation branch through dense feature aggregation."""

    groups = {"encoder": ("rgb_branch.encoder", "rgb_branch.down", "h_branch.encoder", "h_branch.down")}

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if in_channels != 3:
            raise MedsegError(f"triple_unet separates the hematoxylin stain of RGB H&E images, so it needs "
                              f"in_channels=3, got {in_channels}")
        self.register_buffer("inverse_stains", _inverse_stains(), persistent=False)  # fixed, not learned
        self.h_branch = BranchUNet(3, num_classes)
        self.rgb_branch = BranchUNet(3, num_classes)
        self.seg_down = nn.ModuleList(Downsample(WIDTHS[i], WIDTHS[i + 1]) for i in range(3))
        self.seg_encoder = nn.ModuleList([PDFA(WIDTHS[0], 2), *(PDFA(w, 3) for w in WIDTHS[1:])])
        self.seg_up = nn.ModuleList(ConvBNReLU(WIDTHS[i + 1], WIDTHS[i]) for i in reversed(range(3)))
        self.seg_decoder = nn.ModuleList(PDFA(w, 4) for w in reversed(WIDTHS[:3]))
        self.head = nn.Conv2d(WIDTHS[0], num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        h_encoded, h_decoded, h_logits = self.h_branch(hematoxylin_image(x, self.inverse_stains))
        rgb_encoded, rgb_decoded, rgb_logits = self.rgb_branch(x)
        seg = [self.seg_encoder[0]([h_encoded[0], rgb_encoded[0]])]
        for down, fuse, h, rgb in zip(self.seg_down, self.seg_encoder[1:], h_encoded[1:], rgb_encoded[1:]):
            seg.append(fuse([down(seg[-1]), h, rgb]))
        y = seg[-1]
        for up, fuse, skip, h, rgb in zip(self.seg_up, self.seg_decoder, reversed(seg[:-1]), h_decoded, rgb_decoded):
            y = fuse([up(F.interpolate(y, size=h.shape[-2:])), skip, h, rgb])
        nuclei = self.head(y)
        return [nuclei, h_logits, rgb_logits] if self.training else nuclei


def _inverse_stains() -> torch.Tensor:
    stains = torch.tensor(STAINS, dtype=torch.float64)
    return torch.linalg.inv(stains / stains.norm(dim=1, keepdim=True)).float()
