"""Surface metrics of label maps: HD95, ASSD and normalised surface Dice (NSD), computed with MONAI's
`compute_hausdorff_distance(percentile=95)`, `compute_average_surface_distance(symmetric=True)` and
`compute_surface_dice`, per foreground class, in the units of the pixel spacing (pixels when it is 1).

MONAI's definitions (monai 1.6): the surface of a mask is its boundary pixels (the mask minus its binary
erosion; pixels on the image border count); distances are Euclidean between pixel centres, scaled by the spacing
(row, column). HD95 is the larger of the two directed 95th percentiles of the distances from one surface to the
other; ASSD is the mean of the distances of both directions pooled; NSD is the fraction of both surfaces that lies
within the tolerance of the other.

MONAI gives NaN or inf when a side is empty; the rules here are ours and written into summary.json:
- both prediction and reference empty: HD95 and ASSD NaN (undefined: left out of means, counted in n_nan); NSD
  takes the protocol's empty rule (nnunet: NaN, as its Dice; as MONAI's `compute_surface_dice` does);
- one side empty: HD95 and ASSD are the image diagonal (the worst distance the image allows, as BraTS scores an
  empty prediction and Metrics Reloaded recommends: NaN would hide a missed lesion from the mean, inf would make
  every mean inf); NSD 0 (no surface point within the tolerance).
Multi-class: each foreground class k gives `<metric>_class<k>`; `<metric>` is their mean over the classes that
are not NaN.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from medseg.metrics.confusion import EMPTY_RULES, predict_labels

SURFACE_METRICS = ("hd95", "assd", "nsd")
DEFINITIONS = {
    "hd95": "95th-percentile Hausdorff distance between the boundaries (MONAI: the larger directed 95th percentile)",
    "assd": "average symmetric surface distance (MONAI: mean of both directions' boundary distances pooled)",
    "nsd": "normalised surface Dice: fraction of both boundaries within the tolerance of the other",
}
DEFAULT_SPACING = (1.0, 1.0)


@dataclass(frozen=True)
class SurfaceDistance:
    """HD95, ASSD and NSD of the label maps, per image; `tolerance` (NSD) is in the units of the spacing, `empty`
    the NSD of an image where prediction and reference are both empty."""

    tolerance: float = 2.0
    empty: Literal["nan", "one", "zero"] = "nan"
    threshold: float = 0.5
    metrics: tuple[str, ...] = SURFACE_METRICS

    def scorer(self, num_classes: int) -> "SurfaceScorer":
        return SurfaceScorer(self, num_classes)

    def definition(self) -> dict:
        return {"metrics": list(self.metrics), "definitions": DEFINITIONS,
                "nsd_tolerance": self.tolerance,
                "units": "the pixel spacing's (pixels when the spacing is 1); spacing is (row, column)",
                "empty_rules": {
                    "both_empty": f"hd95 and assd NaN (left out, counted in n_nan); nsd {EMPTY_RULES[self.empty]}",
                    "one_empty": "hd95 and assd = the image diagonal (worst possible distance); nsd 0"},
                "labels": f"foreground if probability >= {self.threshold} (multi-class: argmax), unless the labels "
                          "were decided before scoring (a tuned threshold, post-processing, a predicted mask)",
                "aggregation": "per-image mean; multi-class: the mean over the foreground classes, <metric>_class<k> "
                               "each class's"}


def surface_scores(pred: torch.Tensor, truth: torch.Tensor, num_classes: int, spacing: tuple[float, float],
                   tolerance: float, empty: str = "nan") -> dict[str, list[float]]:
    """{hd95, assd, nsd: one value per foreground class 1..K-1} of label maps (H, W) under the rules above."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(truth.shape)} differ in shape")
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    classes = range(1, max(2, num_classes))
    pred_hot = torch.stack([pred == k for k in classes])[None].float()  # (1, K-1, H, W): MONAI's one-hot
    truth_hot = torch.stack([truth == k for k in classes])[None].float()
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():  # MONAI warns about empty masks, which the rules below decide
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(pred_hot, truth_hot, include_background=True, percentile=95,
                                          spacing=spacing)[0]
        assd = compute_average_surface_distance(pred_hot, truth_hot, include_background=True, symmetric=True,
                                                spacing=spacing)[0]
        nsd = compute_surface_dice(pred_hot, truth_hot, [float(tolerance)] * len(classes), include_background=True,
                                   spacing=spacing)[0]
    height, width = pred.shape
    diagonal = math.hypot(height * spacing[0], width * spacing[1])
    out: dict[str, list[float]] = {name: [] for name in SURFACE_METRICS}
    for i in range(len(classes)):
        in_pred, in_truth = bool(pred_hot[0, i].any()), bool(truth_hot[0, i].any())
        if in_pred and in_truth:
            values = (float(hd95[i]), float(assd[i]), float(nsd[i]))
        elif in_pred or in_truth:
            values = (diagonal, diagonal, 0.0)
        else:
            values = (math.nan, math.nan, EMPTY_RULES[empty])
        for name, value in zip(SURFACE_METRICS, values):
            out[name].append(value)
    return out


class SurfaceScorer:
    """Per-case surface metrics; the scorer interface of `medseg.metrics.protocols` (add / per_case / summary)."""

    def __init__(self, protocol: SurfaceDistance, num_classes: int):
        self.protocol = protocol
        self.num_classes = num_classes
        self.values: dict[str, list[list[float]]] = {name: [] for name in protocol.metrics}

    def add(self, probabilities: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
            spacing: tuple[float, float] | None = None) -> None:
        """probabilities (K, H, W) at the mask's size; mask (H, W); `labels` (H, W), when given, replaces
        thresholding the probabilities; `spacing` (row, column), default 1."""
        if labels is None:
            labels = predict_labels(probabilities[None], self.protocol.threshold)[0]
        scores = surface_scores(labels, mask, self.num_classes, spacing or DEFAULT_SPACING, self.protocol.tolerance,
                                self.protocol.empty)
        for name in self.protocol.metrics:
            self.values[name].append(scores[name])

    def _cases(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.protocol.metrics:
            per_class = torch.tensor(self.values[name], dtype=torch.float64).reshape(len(self.values[name]), -1)
            out[name] = per_class.nanmean(dim=1)
        if self.num_classes > 2:
            for name in self.protocol.metrics:
                per_class = torch.tensor(self.values[name], dtype=torch.float64)
                out.update({f"{name}_class{k + 1}": per_class[:, k] for k in range(per_class.shape[1])})
        return out

    def per_case(self) -> dict[str, list[float]]:
        return {name: values.tolist() for name, values in self._cases().items()}

    def summary(self) -> dict[str, dict[str, float]]:
        from medseg.metrics.protocols import per_image_summary  # protocols imports this module

        return {name: per_image_summary(values) for name, values in self._cases().items()}
