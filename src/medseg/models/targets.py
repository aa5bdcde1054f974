"""Targets that networks' auxiliary outputs are trained against, derived from the mask, and the capability of a
network whose edge output is trained against one.

Edge maps. Inf-Net's edge output (Fan et al., "Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT
Images", IEEE TMI 2020, Sec. III-A.1, Eq. 1: a BCE against an edge map computed from the gradient of the ground
truth) and BCS-Net's boundary map (Cong et al., "BCS-Net: Boundary, Context, and Semantic for Automatic COVID-19
Lung Infection Segmentation from CT Images", IEEE TIM 2022, its boundary attention unit) are trained in their
authors' code against edge images made offline from the masks with OpenCV's Canny detector, then read as images and
resized bilinearly to the training size:
- DengPingFan/Inf-Net: Code/utils/format_conversion.py (`binary2edge`: mask thresholded at 128, Canny(10, 150));
  MyTrain_LungInf.py reads them from `Edge/` and scores `lateral_edge` with BCEWithLogitsLoss, weight 1;
- rmcong/BCS-Net-TIM22: BCS-NET.zip Dataset/edgeutil.py (5x5 Gaussian blur of the mask, Canny(30, 150));
  utils/utils.py `TrainDataset` reads them from an edge folder as Inf-Net's loader does.
On a binary mask both give a one-pixel-wide closed contour, each pixel on the foreground or the background side of
the step by Canny's gradient direction (its non-maximum suppression keeps one of two equal-gradient pixels).

`mask_edges` computes, on the mask's device (max-pooling, so it runs on a GPU batch without OpenCV), the foreground
pixels within `width` pixels (chessboard distance) of the background: the mask minus its erosion by a
(2 width + 1) square. At width 1 this is the one-pixel inner contour. Checked against OpenCV on 200 masks of
random rectangles and ellipses (ours): every Canny pixel of either code lies within one pixel of it, about half on
it, and it has 1.06 (BCS-Net) to 1.10 (Inf-Net) times Canny's pixel count (a two-sided morphological gradient would
have twice as many). Canny's side of the step is not reproducible by a fixed morphology, so the inner contour is the
choice (ours). Made at the training size from the resized mask, instead of at the image's own size and then resized,
it stays binary where the codes' targets are bilinearly blurred (ours). The image border is no edge (the erosion
sees only pixels inside the image), as with Canny's replicated border.

Sobel edges. UM-Net's contour output (Du et al., "UM-Net: Rethinking ICGNet for polyp segmentation with uncertainty
modeling", Medical Image Analysis 2025) is trained in the code of the network's earlier name, umICGNet
(chip-xu/umICGNet: utils/sobel.py `Sobel`, utils/loss.py `Deep_Loss`), against a soft edge map made in the loss from
the (N, 1, H, W) float mask, with the same operator applied to the contour's sigmoid map:
- `sobel_edges`: a 3 x 3 mean (zero padded, the zeros counted), then the Sobel derivatives [[1, 0, -1], [2, 0, -2],
  [1, 0, -1]] / 4 and its transpose (zero padded), magnitude sqrt(gx^2 + gy^2 + 1e-4); no threshold. Of a map in
  [0, 1] the magnitude is at most 0.7245 inside the image and sqrt(1 + 1e-4) on its border, where the padding's zeros
  meet a band of ones (ours, by enumeration). It is computed in fp32 under autocast (ours);
- `mask_sobel_edges`: the code halves the mask bilinearly (align_corners=True) to the contour's 1/2 size first, then
  takes `sobel_edges`; the foreground (label > 0) is the code's {0, 1} mask.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.models.base import ExtraLosses

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))  # / 4 (umICGNet utils/sobel.py)
SOBEL_SMOOTH = 1e-4  # under the square root (code: Sobel(1e-4))


def _foreground(caller: str, mask: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float {0, 1}: the foreground (label > 0) of (N, H, W) labels."""
    if mask.dim() != 3:
        raise MedsegError(f"{caller} takes (N, H, W) labels, got shape {tuple(mask.shape)}")
    return (mask > 0).float()[:, None]


def mask_edges(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(N, 1, H, W) float {0, 1}: the foreground (label > 0) pixels of the (N, H, W) label `mask` that lie within
    `width` pixels of the background, on the mask's device."""
    if width < 1:
        raise MedsegError(f"the edge width must be at least 1 pixel, got {width}")
    foreground = _foreground("mask_edges", mask)
    # erosion = a min-pool; max_pool2d pads with -inf, so pixels outside the image never erode the border
    eroded = -F.max_pool2d(-foreground, kernel_size=2 * width + 1, stride=1, padding=width)
    return foreground - eroded


class EdgeSupervised(ExtraLosses):
    """A network with an edge (boundary) output trained against `mask_edges(mask, edge_width)` by BCE with logits
    (the extra loss "edge"): its training forward keeps the edge logits (`keep_for_losses`), scored once."""

    edge_width: ClassVar[int] = 1

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.take_kept()
        target = mask_edges(mask, self.edge_width)
        if target.shape[-2:] != logits.shape[-2:]:  # the codes resize their edge images bilinearly
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return {"edge": F.binary_cross_entropy_with_logits(logits.float(), target)}


def sobel_edges(maps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W) fp32: umICGNet's soft edge magnitude of each map (see the module docstring),
    on the maps' device."""
    if maps.dim() != 4:
        raise MedsegError(f"sobel_edges takes (N, C, H, W) maps, got shape {tuple(maps.shape)}")
    n, c, h, w = maps.shape
    with torch.autocast(maps.device.type, enabled=False):  # a bf16 conv would round the small gradients
        x = F.avg_pool2d(maps.float().reshape(n * c, 1, h, w), kernel_size=3, stride=1, padding=1)
        kernel_x = torch.tensor(SOBEL_X, device=maps.device) / 4
        kernels = torch.stack([kernel_x, kernel_x.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
        gradients = F.conv2d(x, kernels, padding=1)
        return (gradients.square().sum(1, keepdim=True) + SOBEL_SMOOTH).sqrt().reshape(n, c, h, w)


def mask_sobel_edges(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, *size) fp32: `sobel_edges` of the (N, H, W) label `mask`'s foreground resized bilinearly
    (align_corners=True) to `size`, on the mask's device."""
    foreground = _foreground("mask_sobel_edges", mask)
    if foreground.shape[-2:] != tuple(size):
        foreground = F.interpolate(foreground, size=tuple(size), mode="bilinear", align_corners=True)
    return sobel_edges(foreground)
