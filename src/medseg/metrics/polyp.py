"""The polyp-segmentation protocols, computed with pysodmetrics (the community reference, checked
against the MATLAB toolbox) on probability maps resized to each mask's original size.

Both quantise the map to 8 bits as the papers' saved PNGs are, and pysodmetrics then min-max normalises
it and binarises the mask at 128, as the MATLAB toolbox and the authors' script do.

- `pranet`: the standard polyp toolbox (PraNet, MICCAI 2020, and its evaluation code): mean Dice and mean
  IoU over the 256-threshold sweep (per image, then over images), weighted F-measure (beta = 1), S-measure
  (alpha = 0.5), mean and max E-measure over the sweep (max of the mean curve), MAE.
- `m2snet`: the M2SNet authors' test script (Xiaoqi-Zhao-DLUT/MSNet-M2SNet `test_score.py`, `utils/metric.py`):
  soft Dice of the continuous map (smooth 1e-5), IoU of the map > 0.5 (smooth 1e-5), adaptive E-measure
  (threshold 2 x mean), weighted F-measure, S-measure, MAE, and max / adaptive F-measure (beta^2 = 0.3);
  each per image, then the mean (max F: max of the mean curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import py_sod_metrics as sod
import torch
from py_sod_metrics.utils import prepare_data

from medseg.errors import MedsegError

SMOOTH = 1e-5  # the authors' script
# Dataset values taken as the maximum of the image-averaged curve (per_case holds each image's own maximum).
CURVE_MAXIMA = ("max_em", "max_f")


@dataclass(frozen=True)
class MapProtocol:
    """A protocol scored on 8-bit probability maps with pysodmetrics (binary tasks only)."""

    name: str
    description: str
    metrics: tuple[str, ...]
    definitions: tuple[tuple[str, str], ...]
    rank_metric: str

    def definition(self) -> dict:
        return {"name": self.name, "description": self.description, "metrics": list(self.metrics),
                "definitions": dict(self.definitions), "map": "probability x 255, rounded to uint8, min-max normalised",
                "mask": "foreground where the 8-bit mask > 128",
                "resize": "probabilities are resized (bilinear) to each mask's original size before quantising"}

    def scorer(self, num_classes: int) -> "PolypScorer":
        if num_classes > 2:
            raise MedsegError(f"protocol {self.name!r} scores binary maps; this network has {num_classes} classes: "
                              "use --protocol paper or nnunet")
        return PolypScorer(self)


class PolypScorer:
    """Accumulates pysodmetrics objects over cases; per-case values come from their per-sample records."""

    def __init__(self, protocol: MapProtocol):
        self.protocol = protocol
        self.handlers = {
            "dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False),
            "iou": sod.IOUHandler(with_dynamic=True, with_adaptive=False),
            "fm": sod.FmeasureHandler(with_dynamic=True, with_adaptive=True, beta=0.3),
        }
        self.sweep = sod.FmeasureV2(self.handlers)
        self.wfm, self.sm, self.em, self.mae = sod.WeightedFmeasure(), sod.Smeasure(), sod.Emeasure(), sod.MAE()
        self.soft_dice: list[float] = []
        self.iou: list[float] = []

    def add(self, probabilities: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None,
            spacing: tuple[float, float] | None = None) -> None:
        """probabilities (1 or 2, H, W) in [0, 1] (the last channel is the foreground); mask (H, W), 0 = background.
        Map metrics score the probabilities themselves: decided `labels` and `spacing` do not enter them."""
        prediction = (probabilities[-1].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        truth = ((mask > 0).to(torch.uint8) * 255).numpy()
        self.add_maps(prediction, truth)

    def add_maps(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """8-bit map and 8-bit mask (0/255) of one case, exactly as pysodmetrics takes them."""
        for metric in (self.sweep, self.wfm, self.sm, self.em, self.mae):
            metric.step(prediction, truth)
        pred, gt = prepare_data(prediction, truth)
        self.soft_dice.append(float((2 * (pred * gt).sum() + SMOOTH) / (pred.sum() + gt.sum() + SMOOTH)))
        binary = pred > 0.5
        self.iou.append(float(((binary & gt).sum() + SMOOTH) / ((binary | gt).sum() + SMOOTH)))

    def per_case(self) -> dict[str, list[float]]:
        handlers = self.handlers  # each keeps its per-sample curves
        curves = {name: [float(np.mean(c)) for c in handlers[name].dynamic_results] for name in ("dice", "iou")}
        values = {
            "mean_dice": curves["dice"], "mean_iou": curves["iou"],
            "soft_dice": self.soft_dice, "iou": self.iou,
            "wfm": [float(v) for v in self.wfm.weighted_fms], "sm": [float(v) for v in self.sm.sms],
            "mean_em": [float(np.mean(c)) for c in self.em.changeable_ems],
            "max_em": [float(np.max(c)) for c in self.em.changeable_ems],
            "adaptive_em": [float(v) for v in self.em.adaptive_ems],
            "mae": [float(v) for v in self.mae.maes],
            "max_f": [float(np.max(c)) for c in handlers["fm"].dynamic_results],
            "adaptive_f": [float(v) for v in handlers["fm"].adaptive_results],
        }
        return {name: values[name] for name in self.protocol.metrics}

    def summary(self) -> dict[str, dict[str, float]]:
        sweep = self.sweep.get_results()
        em = self.em.get_results()["em"]
        values = {
            "mean_dice": float(np.mean(sweep["dice"]["dynamic"])), "mean_iou": float(np.mean(sweep["iou"]["dynamic"])),
            "soft_dice": float(np.mean(self.soft_dice)), "iou": float(np.mean(self.iou)),
            "wfm": float(self.wfm.get_results()["wfm"]), "sm": float(self.sm.get_results()["sm"]),
            "mean_em": float(np.mean(em["curve"])), "max_em": float(np.max(em["curve"])),
            "adaptive_em": float(em["adp"]),
            "mae": float(self.mae.get_results()["mae"]),
            "max_f": float(np.max(sweep["fm"]["dynamic"])), "adaptive_f": float(sweep["fm"]["adaptive"]),
        }
        per_case = self.per_case()
        out = {}
        for name in self.protocol.metrics:
            out[name] = {"value": values[name], "n": len(self.soft_dice)}
            if name not in CURVE_MAXIMA:  # dataset value = mean of the per-image values: their spread is meaningful
                out[name].update(std=float(np.std(per_case[name])), median=float(np.median(per_case[name])))
        return out


DEFINITIONS = {
    "mean_dice": "Dice at each of 256 thresholds, averaged over thresholds per image, then over images",
    "mean_iou": "IoU at each of 256 thresholds, averaged over thresholds per image, then over images",
    "soft_dice": "(2 sum(p g) + 1e-5) / (sum(p) + sum(g) + 1e-5) on the normalised continuous map, mean over images",
    "iou": "IoU of map > 0.5 with smooth 1e-5, mean over images",
    "wfm": "weighted F-measure (Margolin et al. 2014), beta = 1",
    "sm": "S-measure (Fan et al. 2017), alpha = 0.5",
    "mean_em": "E-measure (Fan et al. 2018) averaged over the 256-threshold curve",
    "max_em": "maximum of the image-averaged 256-threshold E-measure curve",
    "adaptive_em": "E-measure at the adaptive threshold 2 x mean(map)",
    "mae": "mean absolute error between the normalised map and the mask",
    "max_f": "maximum of the image-averaged 256-threshold F-measure curve, beta^2 = 0.3",
    "adaptive_f": "F-measure (beta^2 = 0.3) at the adaptive threshold 2 x mean(map)",
}


def map_protocol(name: str, description: str, metrics: tuple[str, ...], rank: str) -> MapProtocol:
    return MapProtocol(name, description, metrics, tuple((m, DEFINITIONS[m]) for m in metrics), rank)


MAP_PROTOCOLS = {
    "pranet": map_protocol(
        "pranet", "The polyp toolbox of PraNet (MICCAI 2020) as the polyp literature reports it, computed with "
        "pysodmetrics.", ("mean_dice", "mean_iou", "wfm", "sm", "mean_em", "max_em", "mae"), "mean_dice"),
    "m2snet": map_protocol(
        "m2snet", "The M2SNet authors' test script (test_score.py): soft Dice, IoU at 0.5, adaptive E-measure, "
        "weighted F, S-measure, MAE, max and adaptive F; pysodmetrics for the SOD metrics.",
        ("soft_dice", "iou", "adaptive_em", "max_em", "wfm", "sm", "mae", "max_f", "adaptive_f"), "soft_dice"),
}
