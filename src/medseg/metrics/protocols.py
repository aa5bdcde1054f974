"""Named metric protocols: what a reported number means. A metric is a name plus a protocol (threshold,
aggregation per image or pooled, the value of an empty mask, background included or not); the named protocols
reproduce what the papers and the standard toolboxes report (ours).

Two kinds share one interface (`scorer(num_classes)` -> add / per_case / summary, `definition()`,
`rank_metric`): confusion protocols here (paper, nnunet, pooled) and the polyp map protocols of
`medseg.metrics.polyp` (pranet, m2snet).

`summary.json` always records the protocol with its full definition, so a number can be compared
with a paper's only when the protocols match.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from medseg.errors import MedsegError
from medseg.metrics.confusion import FOREGROUND_METRICS, MEAN_METRICS, confusion_counts, predict_labels, summary_metrics
from medseg.metrics.polyp import MAP_PROTOCOLS, MapProtocol


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    threshold: float = 0.5
    aggregation: Literal["per-image", "pooled"] = "per-image"
    empty: Literal["nan", "one", "zero"] = "one"  # value of a metric whose denominator is zero
    metrics: tuple[str, ...] = FOREGROUND_METRICS + MEAN_METRICS

    @property
    def rank_metric(self) -> str:
        return "dice"

    def scorer(self, num_classes: int) -> "ConfusionScorer":
        return ConfusionScorer(self, num_classes)

    def definition(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics),
                "binary_rule": f"foreground if probability >= {self.threshold}; multi-class: argmax",
                "resize": "probabilities are resized (bilinear) to each mask's original size before thresholding"}


PROTOCOLS: dict[str, Protocol | MapProtocol] = {
    p.name: p
    for p in (
        Protocol("paper", "Confusion metrics at threshold 0.5, computed per image and averaged over images; an "
                 "empty prediction on an empty mask scores 1 (the smooth-term convention of the papers' code). "
                 "mDice/mIoU average foreground and background (STS-Net)."),
        Protocol("nnunet", "nnU-Net's evaluation: per-case Dice and IoU at 0.5 (argmax for multi-class), NaN when "
                 "both prediction and reference are empty, mean over the cases that are not NaN.",
                 empty="nan", metrics=("dice", "iou", "precision", "sensitivity")),
        Protocol("pooled", "Confusion metrics at threshold 0.5 from counts pooled over all pixels of all images "
                 "(one global score, common for vessel segmentation).", aggregation="pooled"),
    )
}


PROTOCOLS.update(MAP_PROTOCOLS)


def get_protocol(name: str) -> Protocol | MapProtocol:
    if name not in PROTOCOLS:
        raise MedsegError(f"unknown metric protocol {name!r}; available: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


class ConfusionScorer:
    """Per-case confusion counts under a confusion protocol; the same interface as the map scorers."""

    def __init__(self, protocol: Protocol, num_classes: int):
        self.protocol = protocol
        self.num_classes = num_classes
        self.counts: list[torch.Tensor] = []

    def add(self, probabilities: torch.Tensor, mask: torch.Tensor) -> None:
        """probabilities (K, H, W) at the mask's size; mask (H, W) labels."""
        labels = predict_labels(probabilities[None], self.protocol.threshold)
        self.counts.append(confusion_counts(labels, mask[None], self.num_classes)[0])

    def per_case(self) -> dict[str, list[float]]:
        return {name: values.tolist() for name, values in case_scores(torch.stack(self.counts), self.protocol).items()}

    def summary(self) -> dict[str, dict[str, float]]:
        return summarize(torch.stack(self.counts), self.protocol)


def case_scores(counts: torch.Tensor, protocol: Protocol) -> dict[str, torch.Tensor]:
    """Per-case values (N,) of the protocol's metrics (plus per-class Dice/IoU for multi-class)."""
    values = summary_metrics(counts, protocol.empty)
    keep = [m for m in values if m in protocol.metrics or m.split("_class")[0] in protocol.metrics]
    return {m: values[m] for m in keep}


def summarize(counts: torch.Tensor, protocol: Protocol) -> dict[str, dict[str, float]]:
    """Dataset-level numbers from per-case counts (N, K, 4) under `protocol`."""
    out: dict[str, dict[str, float]] = {}
    if protocol.aggregation == "pooled":
        pooled = case_scores(counts.sum(dim=0, keepdim=True), protocol)
        return {m: {"value": _f(v[0]), "n": int(counts.shape[0])} for m, v in pooled.items()}
    for metric, values in case_scores(counts, protocol).items():
        valid = values[~values.isnan()]
        out[metric] = {
            "value": _f(valid.mean()) if valid.numel() else math.nan,
            "std": _f(valid.std(unbiased=False)) if valid.numel() else math.nan,
            "median": _f(valid.median()) if valid.numel() else math.nan,
            "n": int(valid.numel()),
            "n_nan": int(values.numel() - valid.numel()),
        }
    return out


def _f(value: torch.Tensor) -> float:
    return float(value.item())
