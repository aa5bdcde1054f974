"""Post-processing of predicted label maps: fill holes, drop components smaller than N pixels, keep the
largest connected component; each optional, applied in that order, recorded wherever it was used.

Choices (ours; the papers do not post-process):
- Connected components are 8-connected (scipy.ndimage.label with a full 3 x 3 structure), as
  skimage's default in 2D and nnU-Net's post-processing: 4-connectivity would cut a thin diagonal
  structure (a retinal vessel, a layer edge) into many pieces that a size rule then deletes.
- Holes are background regions not 4-connected to the image border (scipy.ndimage.binary_fill_holes'
  default structure): the background connectivity complementary to 8-connected objects, so a diagonal gap in
  an object's outline does not let a hole leak out.
- Order: holes are filled first, so an object's size (for `min_size` and the largest component) is its area
  as a reader outlines it, a ring counting with its inside; then small components go; then the largest of
  what is left stays (nothing stays when every component is below `min_size`).
- Multi-class: each foreground class is processed on its own binary map. Removed pixels become background.
  A hole is filled only where the prediction is background (an object of another class inside a hole is
  kept); a background pixel inside holes of several classes takes the class of the smallest filled object
  around it (the innermost). Ties of the largest component keep the first in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medseg.errors import MedsegError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class PostProcessing:
    """Which post-processing steps to apply to a label map (H, W) of integer labels, 0 = background."""

    largest_component: bool = False
    min_size: int = 0
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 0:
            raise MedsegError(f"--min-size takes a pixel count >= 0 (0 keeps every component), got {self.min_size!r}")

    @property
    def active(self) -> bool:
        return self.largest_component or self.min_size > 0 or self.fill_holes

    def to_dict(self) -> dict[str, Any]:
        return {"largest_component": self.largest_component, "min_size": self.min_size,
                "fill_holes": self.fill_holes, "connectivity": 8,
                "order": "fill holes, then drop components below min_size, then keep the largest component"}

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (H, W) integers -> the post-processed labels, same dtype and device."""
        if not self.active:
            return labels
        array = labels.cpu().numpy()
        out = array.copy()
        classes = [int(k) for k in np.unique(array) if k != 0]
        if self.fill_holes:
            out = _fill_holes(array, classes)
        for k in classes:
            mask = out == k
            components, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
            if count == 0:
                continue
            sizes = np.bincount(components.ravel())
            sizes[0] = 0  # the background of this class's map
            keep = sizes >= max(self.min_size, 1)
            if self.largest_component and keep[1:].any():
                best = int(np.argmax(np.where(keep, sizes, 0)))  # argmax: the first of equal sizes
                keep = np.zeros_like(keep)
                keep[best] = True
            keep[0] = False
            out[mask & ~keep[components]] = 0
        return torch.from_numpy(out).to(device=labels.device, dtype=labels.dtype)


def _fill_holes(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Background pixels inside an object's holes take its class; the innermost object wins a contested pixel."""
    out = labels.copy()
    claim = np.full(labels.shape, np.iinfo(np.int64).max, dtype=np.int64)  # filled-object area of the claimant
    background = labels == 0
    for k in classes:
        mask = labels == k
        filled = ndimage.binary_fill_holes(mask)
        new = filled & ~mask & background
        if not new.any():
            continue
        objects, _ = ndimage.label(filled, structure=EIGHT_CONNECTED)
        area = np.bincount(objects.ravel())[objects]
        wins = new & (area < claim)
        out[wins] = k
        claim[wins] = area[wins]
    return out


def from_flags(largest_component: bool | None, min_size: int | None, fill_holes: bool | None,
               defaults: dict[str, Any] | None = None) -> PostProcessing:
    """A command's flags over `defaults` (evaluate: the recipe's `eval.postprocess`); a flag left out (None) takes
    the default's value, else off."""
    given = {"largest_component": largest_component, "min_size": min_size, "fill_holes": fill_holes}
    return PostProcessing(**{**(defaults or {}), **{k: v for k, v in given.items() if v is not None}})


FROM_OPTION, TUNED = "--threshold", "tuned: model/threshold.json"


def choose_threshold(given: float | None, tuned: float | None, num_classes: int) -> tuple[float, str]:
    """The decision threshold and where it came from: --threshold, else the model folder's tuned one, else 0.5.
    A multi-class network decides by argmax: the threshold is not used."""
    if num_classes > 1:
        return 0.5 if given is None else given, "unused: multi-class labels are the argmax"
    if given is not None:
        return given, FROM_OPTION
    if tuned is not None:
        return tuned, TUNED
    return 0.5, "default"
