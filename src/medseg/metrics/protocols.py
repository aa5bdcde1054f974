"""Named metric protocols: what a reported number means. A metric is a name plus a protocol (threshold,
aggregation per image or pooled, the value of an empty mask, background included or not); the named protocols
reproduce what the papers and the standard toolboxes report (ours).

Three kinds share one interface (`scorer(num_classes)` -> add / per_case / summary, `definition()`,
`rank_metric`): confusion protocols here (paper, nnunet, pooled; nnunet adds the surface metrics of
`medseg.metrics.surface`), the polyp map protocols of `medseg.metrics.polyp` (pranet, m2snet), and combined
protocols that report the metrics of several parts side by side, as a paper's table does (infnet: M2SNet's
COVID-19 Table 3; goals: its OCT-layer Table 5).

A scorer's `add(probabilities, mask, labels=None, spacing=None)` takes one case: probabilities (K, H, W) at the
mask's size, the reference labels (H, W), optionally the label map already decided (a tuned threshold,
post-processing, a predicted mask), which replaces thresholding for the label metrics (confusion, surface, layer
distance) while map metrics keep using the probabilities, and the pixel spacing (row, column) for distances.

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
from medseg.metrics.layers import MED_DEFINITION, layer_distances
from medseg.metrics.polyp import DEFINITIONS as MAP_DEFINITIONS
from medseg.metrics.polyp import MAP_PROTOCOLS, MapProtocol, map_protocol
from medseg.metrics.surface import SurfaceDistance, SurfaceScorer


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    threshold: float = 0.5
    aggregation: Literal["per-image", "pooled"] = "per-image"
    empty: Literal["nan", "one", "zero"] = "one"  # value of a metric whose denominator is zero
    metrics: tuple[str, ...] = FOREGROUND_METRICS + MEAN_METRICS
    surface: SurfaceDistance | None = None  # HD95, ASSD, NSD beside the confusion metrics (per-image only)

    @property
    def rank_metric(self) -> str:
        return "dice"

    def scorer(self, num_classes: int) -> "ConfusionScorer | CombinedScorer":
        if self.surface is None:
            return ConfusionScorer(self, num_classes)
        return CombinedScorer([ConfusionScorer(self, num_classes), SurfaceScorer(self.surface, num_classes)])

    def definition(self) -> dict:
        out = {**asdict(self), "metrics": list(self.metrics),
               "binary_rule": f"foreground if probability >= {self.threshold}; multi-class: argmax",
               "resize": "probabilities are resized (bilinear) to each mask's original size before thresholding"}
        if self.surface is not None:
            out.update(metrics=list(self.metrics + self.surface.metrics), surface=self.surface.definition())
        else:
            out.pop("surface")
        return out


@dataclass(frozen=True)
class LayerDistance:
    """The layer-edge distance MED (`medseg.metrics.layers`) on the argmax labels, per image; a part of `goals`."""

    threshold: float = 0.5
    metrics: tuple[str, ...] = ("med",)

    def scorer(self, num_classes: int) -> "LayerDistanceScorer":
        return LayerDistanceScorer(self, num_classes)

    def definition(self) -> dict:
        return {"metrics": list(self.metrics), "definitions": {"med": MED_DEFINITION},
                "aggregation": "per-image mean; med is the mean over the layers, med_class<k> each layer's"}


@dataclass(frozen=True)
class CombinedProtocol:
    """The metrics of several parts (confusion, map, layer-distance protocols) side by side, per image."""

    name: str
    description: str
    parts: tuple[Protocol | MapProtocol | LayerDistance, ...]
    definitions: tuple[tuple[str, str], ...]
    rank_metric: str

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(m for part in self.parts for m in part.metrics)

    def scorer(self, num_classes: int) -> "CombinedScorer":
        return CombinedScorer([part.scorer(num_classes) for part in self.parts])

    def definition(self) -> dict:
        return {"name": self.name, "description": self.description, "metrics": list(self.metrics),
                "definitions": dict(self.definitions), "parts": [part.definition() for part in self.parts]}


INFNET = CombinedProtocol(
    "infnet", "COVID-19 lung infection as M2SNet's Table 3 reports it, following Inf-Net (TMI 2020): Dice (DSC), "
    "precision and recall at 0.5 per image (an empty denominator scores 1), S-measure and MAE of the probability "
    "map (pysodmetrics), each the mean over images.",
    (Protocol("infnet-confusion", "Dice, precision, recall at 0.5 per image", metrics=("dice", "precision",
                                                                                     "sensitivity")),
     map_protocol("infnet-maps", "S-measure and MAE of the 8-bit map", ("sm", "mae"), "sm")),
    (("dice", "Dice (DSC) of probability >= 0.5"), ("precision", "precision at 0.5"),
     ("sensitivity", "recall at 0.5"), ("sm", MAP_DEFINITIONS["sm"]), ("mae", MAP_DEFINITIONS["mae"])),
    "dice")

GOALS = CombinedProtocol(
    "goals", "OCT layer segmentation as the GOALS 2022 challenge and M2SNet's Table 5 report it: Dice and the "
    "mean Euclidean distance of the edges (MED) of every layer (foreground class), on the argmax labels per image, "
    "mean over images; an empty denominator scores Dice 1.",
    (Protocol("goals-dice", "Dice per layer on the argmax labels", metrics=("dice",)), LayerDistance()),
    (("dice", "Dice on the argmax labels, mean over the layers (dice_class<k>: layer k)"),
     ("med", MED_DEFINITION + "; mean over the layers (med_class<k>: layer k)")),
    "dice")


PROTOCOLS: dict[str, Protocol | MapProtocol | CombinedProtocol] = {
    p.name: p
    for p in (
        Protocol("paper", "Confusion metrics at threshold 0.5, computed per image and averaged over images; an "
                 "empty prediction on an empty mask scores 1 (the smooth-term convention of the papers' code). "
                 "mDice/mIoU average foreground and background (STS-Net)."),
        Protocol("nnunet", "nnU-Net's evaluation: per-case Dice and IoU at 0.5 (argmax for multi-class), NaN when "
                 "both prediction and reference are empty, mean over the cases that are not NaN; with the surface "
                 "metrics HD95, ASSD and NSD (tolerance 2 spacing units) by MONAI.",
                 empty="nan", metrics=("dice", "iou", "precision", "sensitivity"),
                 surface=SurfaceDistance(tolerance=2.0, empty="nan")),
        Protocol("pooled", "Confusion metrics at threshold 0.5 from counts pooled over all pixels of all images "
                 "(one global score, common for vessel segmentation).", aggregation="pooled"),
    )
}


PROTOCOLS.update(MAP_PROTOCOLS)
PROTOCOLS.update({INFNET.name: INFNET, GOALS.name: GOALS})


def get_protocol(name: str) -> Protocol | MapProtocol | CombinedProtocol:
    if name not in PROTOCOLS:
        raise MedsegError(f"unknown metric protocol {name!r}; available: {', '.join(sorted(PROTOCOLS))}")
    return PROTOCOLS[name]


class ConfusionScorer:
    """Per-case confusion counts under a confusion protocol; the same interface as the map scorers."""

    def __init__(self, protocol: Protocol, num_classes: int):
        self.protocol = protocol
        self.num_classes = num_classes
        self.counts: list[torch.Tensor] = []

    def add(self, probabilities: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
            spacing: tuple[float, float] | None = None) -> None:
        """probabilities (K, H, W) at the mask's size; mask (H, W) labels; `labels` (H, W), when given, replaces
        thresholding the probabilities; `spacing` is not used by confusion metrics."""
        if labels is None:
            labels = predict_labels(probabilities[None], self.protocol.threshold)[0]
        self.counts.append(confusion_counts(labels[None], mask[None], self.num_classes)[0])

    def per_case(self) -> dict[str, list[float]]:
        return {name: values.tolist() for name, values in case_scores(torch.stack(self.counts), self.protocol).items()}

    def summary(self) -> dict[str, dict[str, float]]:
        return summarize(torch.stack(self.counts), self.protocol)


class LayerDistanceScorer:
    """Per-case MED of every foreground class; `med` is their mean (NaN-aware), `med_class<k>` each for K > 2."""

    def __init__(self, protocol: LayerDistance, num_classes: int):
        self.protocol = protocol
        self.num_classes = num_classes
        self.values: list[list[float]] = []

    def add(self, probabilities: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
            spacing: tuple[float, float] | None = None) -> None:
        """As `ConfusionScorer.add`; MED is in pixels, so `spacing` is not used."""
        if labels is None:
            labels = predict_labels(probabilities[None], self.protocol.threshold)[0]
        self.values.append(layer_distances(labels, mask, self.num_classes))

    def _cases(self) -> dict[str, torch.Tensor]:
        per_class = torch.tensor(self.values, dtype=torch.float64).reshape(len(self.values), -1)
        out = {"med": per_class.nanmean(dim=1)}
        if self.num_classes > 2:
            out.update({f"med_class{k + 1}": per_class[:, k] for k in range(per_class.shape[1])})
        return out

    def per_case(self) -> dict[str, list[float]]:
        return {name: values.tolist() for name, values in self._cases().items()}

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: per_image_summary(values) for name, values in self._cases().items()}


class CombinedScorer:
    def __init__(self, scorers: list):
        self.scorers = scorers

    def add(self, probabilities: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
            spacing: tuple[float, float] | None = None) -> None:
        for scorer in self.scorers:
            scorer.add(probabilities, mask, labels, spacing)

    def per_case(self) -> dict[str, list[float]]:
        return {name: values for scorer in self.scorers for name, values in scorer.per_case().items()}

    def summary(self) -> dict[str, dict[str, float]]:
        return {name: values for scorer in self.scorers for name, values in scorer.summary().items()}


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
        out[metric] = per_image_summary(values)
    return out


def per_image_summary(values: torch.Tensor) -> dict[str, float]:
    """Mean, std, median over the cases that are not NaN, their count and the count of NaN ones."""
    valid = values[~values.isnan()]
    return {
        "value": _f(valid.mean()) if valid.numel() else math.nan,
        "std": _f(valid.std(unbiased=False)) if valid.numel() else math.nan,
        "median": _f(valid.median()) if valid.numel() else math.nan,
        "n": int(valid.numel()),
        "n_nan": int(values.numel() - valid.numel()),
    }


def _f(value: torch.Tensor) -> float:
    return float(value.item())
