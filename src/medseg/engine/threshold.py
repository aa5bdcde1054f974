"""`medseg tune-threshold`: the binary decision threshold that scores best on a run's validation split, stored
in its model folder (model/threshold.json) where predict and evaluate find it.

The validation images are predicted as evaluate predicts them by default (the model's inference plan: resized
to the training size, or tiled for a network trained on crops; probabilities at each mask's size); every
threshold of the grid is scored on one label metric, Dice by default (ours: the overlap the papers report).
Aggregation and the empty-mask rule are those of the run's protocol when it is a confusion protocol (paper,
nnunet, pooled), else the `paper` rule (per image, an empty prediction of an empty mask scores 1). The best
threshold wins; among equal scores, the one closest to 0.5 (the untuned default). Post-processing is not applied
while tuning. Multi-class networks are refused: argmax has no threshold. Only the validation split is used, so
the test split still evaluates the tuned threshold fairly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from medseg.engine.evaluate import case_probabilities, select_cases
from medseg.engine.inference import build_plan
from medseg.engine.run import Run, now
from medseg.errors import MedsegError
from medseg.files import user_write_errors, write_text_atomic
from medseg.metrics import Protocol, confusion_counts, summarize
from medseg.models.saving import THRESHOLD_NAME

DEFAULT_GRID = "0.05..0.95 step 0.05"
# Metrics that weigh false positives against false negatives; sensitivity or specificity alone would pick an end
# of the grid.
TUNABLE = ("dice", "iou")
MAX_GRID = 1000


def parse_grid(text: str) -> list[float]:
    """'0.05..0.95 step 0.05' or '0.3,0.4,0.5' -> sorted thresholds, each strictly between 0 and 1."""
    hint = f"--grid takes START..STOP step STEP (e.g. {DEFAULT_GRID}) or comma-separated thresholds (0.3,0.5)"
    try:
        if ".." in text:
            span, _, step_text = text.partition("step")
            start, stop = (float(v) for v in span.split(".."))
            step = float(step_text)
            if not step > 0 or stop < start:
                raise MedsegError(f"{hint}, with STEP > 0 and STOP >= START; got {text!r}")
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > MAX_GRID:
                raise MedsegError(f"--grid {text!r} has {count} thresholds; give at most {MAX_GRID}")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MedsegError(f"{hint}; got {text!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and 0 < v < 1)]
    if bad or not values:
        raise MedsegError(f"--grid {text!r}: every threshold must lie strictly between 0 and 1 (got {bad or 'none'})")
    return sorted(set(values))


def scoring_rule(run: Run, metric: str) -> Protocol:
    """The confusion protocol whose aggregation and empty rule score the grid (see the module docstring)."""
    from medseg.metrics import get_protocol

    if metric not in TUNABLE:
        raise MedsegError(f"--metric must be one of {', '.join(TUNABLE)} (a metric that weighs false positives "
                          f"against false negatives), got {metric!r}")
    protocol = get_protocol(run.recipe().eval.protocol)
    base = protocol if isinstance(protocol, Protocol) else get_protocol("paper")
    return Protocol(f"tune-{base.name}", base.description, aggregation=base.aggregation, empty=base.empty,
                    metrics=(metric,))


def tune_threshold(run_path: str | Path, data: str | Path | None = None, metric: str = "dice",
                   grid: str = DEFAULT_GRID, batch_size: int = 8, device: str = "auto",
                   precision: str = "auto", workers: int | None = None) -> dict[str, Any]:
    """Score every threshold of `grid` on the run's validation split, write the best into RUN/model/threshold.json
    and return what was written."""
    run = Run(run_path).require()
    thresholds = parse_grid(grid)
    rule = scoring_rule(run, metric)
    if batch_size < 1:
        raise MedsegError(f"--batch-size must be at least 1, got {batch_size}")
    data = Path(data) if data is not None else run.data_root()
    if not data.is_dir():
        raise MedsegError(f"data folder {data} does not exist (the run was trained on it; give --data where it is "
                          "now)")
    plan = build_plan([run.path], device, precision=precision, batch_size=batch_size)
    predictor = plan.reference
    if predictor.num_classes != 1:
        raise MedsegError(f"{run.path}: the network has {predictor.num_classes} output classes and decides by argmax, "
                          "which has no threshold to tune; tune-threshold is for binary (one-channel) networks")
    cases, _ = select_cases(run, data, "val")
    counts = []  # per case: (T, 2, 4) confusion counts, one row per threshold
    for _, _, prob, mask in case_probabilities(plan, data, cases, batch_size, workers, "tune-threshold"):
        counts.append(torch.stack([confusion_counts((prob[0] >= t).long()[None], mask[None], 1)[0]
                                   for t in thresholds]))
    stacked = torch.stack(counts)  # (N, T, 2, 4)
    scores = [summarize(stacked[:, i], rule)[metric]["value"] for i in range(len(thresholds))]
    ranked = [(-math.inf if math.isnan(s) else s) for s in scores]
    if all(math.isinf(s) for s in ranked):
        raise MedsegError(f"{metric} is undefined (NaN) at every threshold on the {len(cases)} validation cases "
                          f"(empty masks under the {rule.empty!r} rule); nothing to tune on")
    best = max(range(len(thresholds)), key=lambda i: (ranked[i], -abs(thresholds[i] - 0.5)))
    record = {
        "threshold": thresholds[best],
        "metric": metric,
        "score": scores[best],
        "aggregation": rule.aggregation,
        "empty": rule.empty,
        "rule": f"best {metric} over the grid; ties: the threshold closest to 0.5; no post-processing",
        "split": "val",
        "cases": len(cases),
        "data": str(data.resolve()),
        "run": str(run.path.resolve()),
        "grid": [{"threshold": t, metric: None if math.isnan(s) else s} for t, s in zip(thresholds, scores)],
        "created": now(),
    }
    with user_write_errors():
        write_text_atomic(predictor.folder / THRESHOLD_NAME, json.dumps(record, indent=2) + "\n")
    return {**record, "file": str(predictor.folder / THRESHOLD_NAME)}
