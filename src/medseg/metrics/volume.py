"""Per-volume metrics of 3D label volumes in millimetres: Dice, IoU, HD95 and ASSD per foreground.

The papers score 2D slices (STS-Net, Sci. Rep. 2025, Eq. 10-11; ANU-Net, Computers & Graphics 2020, Sec. 4.2)
and say nothing about whole volumes; the volume protocol here is ours and follows nnU-Net's evaluation (Dice and
IoU per case and per label, NaN when prediction and reference are both empty) and the surface definitions of
`medseg.metrics.surface`, now on 3D surfaces with the volume's voxel spacing, so distances are in mm:
- Dice = 2|P∩R| / (|P| + |R|), IoU = |P∩R| / |P∪R|, counted in voxels;
- HD95 and ASSD by MONAI (`compute_hausdorff_distance(percentile=95)`,
  `compute_average_surface_distance(symmetric=True)`; computed once from the distances both of them take from
  `monai.metrics.utils.get_edge_surface_distance`) with `spacing=` the volume's (X, Y, Z) voxel size: the
  surface of a mask is its voxels minus its binary erosion (voxels on the volume's border count), distances are
  Euclidean between voxel centres in mm. HD95 is the larger of the two directed 95th percentiles (linear
  interpolation), ASSD the mean of both directions' distances pooled.
Empty rules (as surface.py, written into summary.json by the caller):
- both empty: Dice and IoU by the `empty` rule (default `nan`, nnU-Net's: left out of means), HD95 and ASSD NaN;
- one side empty: Dice and IoU 0, HD95 and ASSD the volume's diagonal in mm (the worst distance the volume
  allows; NaN would hide a missed lesion from the mean, inf would make every mean inf).

What is foreground is a `Foreground`: the label values of the prediction and of the reference counted together.
`label(k)` compares label k with label k (multi-label volumes, one row per label); `merged((1, 2))` counts
labels 1 and 2 as one foreground on both sides (liver 1 + tumour 2 = the whole liver); `foregrounds_for` gives
what evaluate compares for a model of `num_classes` (a binary model's class 1 against the reference labels
chosen, every label > 0 by default).

`slice_metrics` gives the same Dice / IoU per axial slice k (the volume's last axis, as `medseg slices` cuts
it) for every slice with foreground in either volume: where along the volume a prediction fails.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medseg.metrics.confusion import EMPTY_RULES
from medseg.metrics.protocols import per_image_summary

VOLUME_METRICS = ("dice", "iou", "hd95_mm", "assd_mm")
SLICE_METRICS = ("dice", "iou")
DEFINITIONS = {
    "dice": "2|P∩R| / (|P| + |R|) over the voxels of the volume",
    "iou": "|P∩R| / |P∪R| over the voxels of the volume",
    "hd95_mm": "95th-percentile Hausdorff distance between the 3D surfaces in mm (MONAI: the larger directed 95th "
               "percentile, voxel spacing applied)",
    "assd_mm": "average symmetric surface distance between the 3D surfaces in mm (MONAI: mean of both directions' "
               "distances pooled)",
}


@dataclass(frozen=True)
class Foreground:
    """The label values counted as foreground in one comparison; None means every value > 0."""

    prediction: tuple[int, ...] | None
    reference: tuple[int, ...] | None

    @property
    def name(self) -> str:
        """How reports name it: the reference's labels ("1", "1+2", ">0")."""
        return ">0" if self.reference is None else "+".join(str(v) for v in self.reference)

    def masks(self, pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _select(pred, self.prediction), _select(truth, self.reference)


def _select(labels: np.ndarray, values: tuple[int, ...] | None) -> np.ndarray:
    return labels > 0 if values is None else np.isin(labels, values)


def label(k: int) -> Foreground:
    """Label k of the prediction against label k of the reference."""
    return Foreground((int(k),), (int(k),))


def merged(values: Sequence[int]) -> Foreground:
    """The labels `values` counted together as one foreground, in prediction and reference alike."""
    values = tuple(sorted({int(v) for v in values}))
    if not values or min(values) < 1:
        raise ValueError(f"merged labels must be values > 0, got {values}")
    return Foreground(values, values)


def foregrounds_for(num_classes: int, labels: Sequence[int] | None = None) -> list[Foreground]:
    """What to compare for a model of `num_classes`: a binary model (one foreground class) compares its class 1
    with the reference labels `labels` merged (default every label > 0); a multi-class model compares each class k
    with label k, or, given `labels`, those labels merged on both sides."""
    if num_classes <= 2:
        return [Foreground((1,), None if labels is None else merged(labels).reference)]
    if labels is None:
        return [label(k) for k in range(1, num_classes)]
    return [merged(labels)]


def as_foreground(spec: int | Sequence[int] | Foreground) -> Foreground:
    if isinstance(spec, Foreground):
        return spec
    if isinstance(spec, (int, np.integer)):
        return label(int(spec))
    return merged(spec)


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The volume's diagonal in mm: the distance that stands in when one side is empty."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def overlap(pred: np.ndarray, truth: np.ndarray, empty: str = "nan") -> tuple[float, float]:
    """(Dice, IoU) of two boolean masks; both empty -> the `empty` rule."""
    both = int(np.count_nonzero(pred & truth))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return EMPTY_RULES[empty], EMPTY_RULES[empty]
    return 2 * both / total, both / (total - both)


def surface_distances_mm(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> tuple[float, float]:
    """(HD95, ASSD) in the spacing's units of two boolean volumes, by MONAI, with the empty rules above."""
    in_pred, in_truth = bool(pred.any()), bool(truth.any())
    if not (in_pred or in_truth):
        return math.nan, math.nan
    if not (in_pred and in_truth):
        worst = diagonal_mm(pred.shape, spacing)
        return worst, worst
    from monai.metrics.utils import get_edge_surface_distance

    # MONAI crops to the union's bounding box plus one voxel itself; cropping first (same box, the volume's border
    # still counting as outside) keeps its float copies to the lesion's size rather than the whole CT.
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in np.nonzero(pred | truth))
    pred_box = torch.from_numpy(np.ascontiguousarray(pred[box])).float()  # float, as MONAI's compute_* cast
    truth_box = torch.from_numpy(np.ascontiguousarray(truth[box])).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # One surface extraction and distance transform per direction for both metrics: what
        # compute_hausdorff_distance(percentile=95) and compute_average_surface_distance(symmetric=True) each do
        _, directed, _ = get_edge_surface_distance(pred_box, truth_box, distance_metric="euclidean",
                                                   spacing=[float(s) for s in spacing], symmetric=True)
    hd95 = torch.max(torch.stack([torch.quantile(d, 0.95) for d in directed]))
    assd = torch.cat(directed).mean()
    return float(hd95.float()), float(assd.float())  # float32, as MONAI's result tensors hold them


def volume_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                   classes: Sequence[int | Sequence[int] | Foreground], empty: str = "nan") -> list[dict]:
    """One row per foreground of `classes`: {labels, dice, iou, hd95_mm, assd_mm, reference_voxels,
    predicted_voxels} of label volumes `pred` and `truth` (X, Y, Z) with voxel `spacing` (mm per axis)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and reference {truth.shape} differ in shape")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not give one value per axis of {pred.shape}")
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty rule must be one of {sorted(EMPTY_RULES)}, got {empty!r}")
    rows = []
    for foreground in (as_foreground(c) for c in classes):
        pred_mask, truth_mask = foreground.masks(pred, truth)
        dice, iou = overlap(pred_mask, truth_mask, empty)
        hd95, assd = surface_distances_mm(pred_mask, truth_mask, spacing)
        rows.append({"labels": foreground.name, "dice": dice, "iou": iou, "hd95_mm": hd95, "assd_mm": assd,
                     "reference_voxels": int(np.count_nonzero(truth_mask)),
                     "predicted_voxels": int(np.count_nonzero(pred_mask))})
    return rows


def slice_metrics(pred: np.ndarray, truth: np.ndarray,
                  classes: Sequence[int | Sequence[int] | Foreground]) -> list[dict]:
    """2D Dice and IoU per axial slice k (last axis) and foreground, for the slices with foreground in either
    volume (so neither is ever empty there): {labels, slice, dice, iou, reference_voxels, predicted_voxels}."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and reference {truth.shape} differ in shape")
    rows = []
    for foreground in (as_foreground(c) for c in classes):
        pred_mask, truth_mask = foreground.masks(pred, truth)
        in_plane = tuple(range(pred.ndim - 1))
        both = np.count_nonzero(pred_mask & truth_mask, axis=in_plane)
        predicted = np.count_nonzero(pred_mask, axis=in_plane)
        reference = np.count_nonzero(truth_mask, axis=in_plane)
        for k in np.flatnonzero(predicted + reference):
            total = int(predicted[k] + reference[k])
            rows.append({"labels": foreground.name, "slice": int(k), "dice": 2 * int(both[k]) / total,
                         "iou": int(both[k]) / (total - int(both[k])), "reference_voxels": int(reference[k]),
                         "predicted_voxels": int(predicted[k])})
    return rows


@dataclass(frozen=True)
class VolumeProtocol:
    """The volume protocol as summary.json records it (the `definition()` of medseg's protocols)."""

    empty: str = "nan"
    name: str = "volume"
    rank_metric: str = "dice"

    def definition(self) -> dict:
        return {"name": self.name,
                "description": "per-volume Dice and IoU (voxels) and HD95 / ASSD between 3D surfaces in mm, per "
                               "foreground, then mean / median / std over the volumes (nnU-Net-style, ours)",
                "metrics": list(VOLUME_METRICS), "definitions": DEFINITIONS,
                "units": {"dice": "fraction", "iou": "fraction", "hd95_mm": "mm", "assd_mm": "mm"},
                "empty": self.empty,
                "empty_rules": {
                    "both_empty": f"dice and iou {EMPTY_RULES[self.empty]}, hd95_mm and assd_mm NaN (NaN is left "
                                  "out of the mean and counted in n_nan)",
                    "one_empty": "dice and iou 0; hd95_mm and assd_mm = the volume's diagonal in mm (the worst "
                                 "distance the volume allows)"},
                "aggregation": "per-volume values; mean, std (population) and median over the volumes that are not "
                               "NaN; with several foregrounds <metric>_label<k> is each one's and <metric> the "
                               "per-volume mean over them"}


def summarize_volumes(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: mean / std / median / n / n_nan over the volumes} of `volume_metrics` rows of several volumes
    (each volume's rows in one order of foregrounds)."""
    names = list(dict.fromkeys(row["labels"] for row in rows))
    out = {}
    for metric in VOLUME_METRICS:
        per_foreground = torch.tensor([[row[metric] for row in rows if row["labels"] == name] for name in names],
                                      dtype=torch.float64)  # (foregrounds, volumes)
        out[metric] = per_image_summary(per_foreground.nanmean(dim=0))
        if len(names) > 1:
            out.update({f"{metric}_label{name}": per_image_summary(values) for name, values in
                        zip(names, per_foreground)})
    return out
