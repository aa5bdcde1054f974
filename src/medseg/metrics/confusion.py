"""Confusion-matrix metrics with an explicit protocol.

Every number depends on three choices that papers rarely state; here they are arguments:
- threshold: a binary pixel is foreground when its probability is >= threshold (multi-class: argmax);
- aggregation: `per-image` (metric per image, then the mean over images) or `pooled` (counts summed
  over the dataset, then one metric; smp's "micro");
- empty rule: the value of a metric whose denominator is zero (e.g. Dice of an empty prediction on an
  empty mask): `nan` (left out of means), `one` (perfect) or `zero`.

Definitions, from the counts of one class (tp, fp, fn, tn):
  dice = 2tp / (2tp + fp + fn)            iou (Jaccard) = tp / (tp + fp + fn)
  sensitivity (recall) = tp / (tp + fn)   specificity = tn / (tn + fp)
  precision = tp / (tp + fp)              accuracy = (tp + tn) / (tp + fp + fn + tn)
Foreground metrics average the foreground classes (class 1 for binary). `mdice` / `miou` average
Dice / IoU over all classes *including background*, as STS-Net defines them (Sci. Rep. 2025, Eq. 10-11).
"""

from __future__ import annotations

import math

import torch

COUNTS = ("tp", "fp", "fn", "tn")
FOREGROUND_METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "accuracy")
MEAN_METRICS = ("mdice", "miou")
EMPTY_RULES = {"nan": math.nan, "one": 1.0, "zero": 0.0}


def predict_labels(probabilities: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B, C, H, W) probabilities -> (B, H, W) integer labels: threshold for C = 1, argmax otherwise."""
    if probabilities.shape[1] == 1:
        return (probabilities[:, 0] >= threshold).long()
    return probabilities.argmax(dim=1)


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image, per-class counts (B, K, 4) = (tp, fp, fn, tn), K = max(2, num_classes).

    `pred` and `target` are integer label maps (B, H, W); a binary task has K = 2 classes
    (background 0, foreground 1).
    """
    classes = max(2, num_classes)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    batch = pred.shape[0]
    pred = pred.reshape(batch, -1).long()
    target = target.reshape(batch, -1).long()
    total = pred.shape[1]
    # Joint histogram of (target, pred) per image, one bincount for the whole batch.
    offsets = torch.arange(batch, device=pred.device).unsqueeze(1) * classes * classes
    joint = torch.bincount((offsets + target * classes + pred).reshape(-1), minlength=batch * classes * classes)
    joint = joint.reshape(batch, classes, classes)  # [b, true, pred]
    tp = joint.diagonal(dim1=1, dim2=2)
    fp = joint.sum(dim=1) - tp
    fn = joint.sum(dim=2) - tp
    tn = total - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor, empty: str) -> torch.Tensor:
    value = numerator.double() / denominator.double().clamp(min=1)
    return torch.where(denominator > 0, value, torch.full_like(value, EMPTY_RULES[empty]))


def class_metrics(counts: torch.Tensor, empty: str = "one") -> dict[str, torch.Tensor]:
    """Every foreground metric per class, from counts (..., K, 4); each result has shape (..., K)."""
    if empty not in EMPTY_RULES:
        raise ValueError(f"empty rule must be one of {sorted(EMPTY_RULES)}, got {empty!r}")
    tp, fp, fn, tn = counts.unbind(-1)
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, empty),
        "iou": _ratio(tp, tp + fp + fn, empty),
        "sensitivity": _ratio(tp, tp + fn, empty),
        "specificity": _ratio(tn, tn + fp, empty),
        "precision": _ratio(tp, tp + fp, empty),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn, empty),
    }


def summary_metrics(counts: torch.Tensor, empty: str = "one") -> dict[str, torch.Tensor]:
    """Foreground metrics (mean over classes 1..K-1, NaN-aware) plus mDice / mIoU over all K classes."""
    per_class = class_metrics(counts, empty)
    result = {name: torch.nanmean(values[..., 1:], dim=-1) for name, values in per_class.items()}
    result["mdice"] = torch.nanmean(per_class["dice"], dim=-1)
    result["miou"] = torch.nanmean(per_class["iou"], dim=-1)
    if counts.shape[-2] > 2:
        for name in ("dice", "iou"):
            for k in range(1, counts.shape[-2]):
                result[f"{name}_class{k}"] = per_class[name][..., k]
    return result
