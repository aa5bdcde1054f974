"""`medseg evaluate RUN --data VOLUMES`: score a run trained on slices on whole volumes, in millimetres.

VOLUMES is a folder of image / label volume pairs as `medseg slices` reads them (`data/volumes.find_pairs`:
images/ + labels/ of NIfTI, NRRD, MetaImage or DICOM series folders, or nnU-Net's imagesTr/labelsTr). Each image
volume is predicted slice by slice exactly as the run's training slices were cut (`volume_predict.predict_volume`
with the slicing its model folder records), the label volume must lie on the same voxel grid (as `slices`
requires), and the two are compared with `medseg.metrics.volume`: Dice, IoU, HD95 and ASSD per foreground, the
distances in mm from the image volume's voxel spacing.

What is compared (`--labels`, ours: the papers score 2D slices only): a binary model's foreground against the
reference labels given (e.g. liver 1 + tumour 2 = `--labels 1,2`), every label > 0 by default; a multi-class
model's class k against label k, or with `--labels` those labels merged on both sides.

Writes RUN/eval/<volumes>-volumes[-labels<a-b>][plan suffixes]/ atomically: per_volume.csv, summary.json (the
protocol with its units and empty rules, mean / median / std over the volumes, the spacing source, the model, the
slicing, the label merging, the inference plan and decision), report.md (the table, best and worst volumes) and,
with `--per-slice`, per_slice.csv (2D Dice / IoU of every axial slice with foreground in either volume).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.volumes import find_pairs, read_pair
from medseg.engine.evaluate import MOVE_ASIDE, decision_suffix, plan_suffix
from medseg.engine.inference import build_plan
from medseg.engine.postprocess import PostProcessing, choose_threshold
from medseg.engine.run import Run, slug
from medseg.engine.score import model_record, report_record
from medseg.engine.volume_predict import predict_volume, slicing_of
from medseg.errors import MedsegError
from medseg.files import atomic_folder, check_output_folder, user_write_errors
from medseg.metrics.volume import (
    SLICE_METRICS,
    VOLUME_METRICS,
    VolumeProtocol,
    foregrounds_for,
    slice_metrics,
    summarize_volumes,
    volume_metrics,
)
from medseg.progress import Progress

SHOWN = 3  # best and worst volumes named in report.md


def parse_labels(text: str | None) -> tuple[int, ...] | None:
    """--labels: label values > 0 separated by commas (e.g. 1,2), or None."""
    if text is None or not str(text).strip():
        return None
    try:
        values = tuple(sorted({int(part) for part in str(text).split(",")}))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise MedsegError(f"--labels takes label values > 0 separated by commas (e.g. 1,2 to count labels 1 and 2 "
                          f"as one foreground); got {text!r}")
    return values


def labels_record(num_classes: int, labels: tuple[int, ...] | None) -> str:
    """What summary.json and report.md say was compared."""
    if num_classes <= 2:
        reference = "every label > 0" if labels is None else "labels " + " + ".join(map(str, labels)) + " merged"
        return f"the model's foreground against the reference's {reference}"
    if labels is None:
        return f"each class k of the model against label k of the reference (k = 1..{num_classes - 1})"
    return "labels " + " + ".join(map(str, labels)) + " merged into one foreground in prediction and reference"


def _check_reference(labels: np.ndarray, path: Path, num_classes: int, merging: tuple[int, ...] | None) -> None:
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise MedsegError(f"label volume {path} holds fractional values; save integer labels (0 = background)")
    if num_classes > 2 and merging is None and labels.max(initial=0) >= num_classes:
        raise MedsegError(f"label volume {path} holds label {int(labels.max())} but the model predicts classes "
                          f"0..{num_classes - 1}; merge reference labels with --labels (e.g. --labels 1,2)")


def evaluate_volumes(run: Run, data: Path, labels: str | None = None, per_slice: bool = False, batch_size: int = 8,
                     device: str = "auto", level: int | None = None, precision: str = "auto", *,
                     ensemble: list[str | Path] = (), tile: str | None = None, overlap: float | None = None,
                     tta: str = "none", threshold: float | None = None,
                     postprocessing: PostProcessing | None = None) -> Path:
    """Predict every image volume of `data` with the run and score it against its label volume; returns the eval
    folder. The other arguments plan inference and decide labels as in `evaluate`."""
    merging = parse_labels(labels)
    pairs = find_pairs(data)
    check_output_folder(run.path / "eval", "output folder", MOVE_ASIDE)
    plan = build_plan([run.path, *ensemble], device, level, precision, tile, overlap, tta, batch_size=batch_size)
    predictor = plan.reference
    slicing = slicing_of(predictor.config)
    tuned = predictor.threshold if len(plan.predictors) == 1 else None
    threshold, threshold_source = choose_threshold(threshold, tuned, predictor.num_classes)
    recipe_postprocessing = PostProcessing(**run.recipe().eval.postprocess.model_dump())
    postprocessing = postprocessing or recipe_postprocessing
    foregrounds = foregrounds_for(predictor.num_classes, merging)
    protocol = VolumeProtocol()

    rows: list[dict[str, Any]] = []
    slice_rows: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    with Progress("evaluate", len(pairs), unit="volumes") as progress:
        for stem, image_path, label_path in pairs:
            image, reference = read_pair(image_path, label_path)
            _check_reference(reference.array, label_path, predictor.num_classes, merging)
            predicted = predict_volume(plan, image, slicing, threshold, postprocessing, batch_size).labels
            truth = reference.array  # its own dtype: an int64 copy of a CT-sized label volume would cost GBs
            for row in volume_metrics(predicted, truth, image.spacing, foregrounds, protocol.empty):
                rows.append({"volume": stem, **row})
            if per_slice:
                slice_rows += [{"volume": stem, **row} for row in slice_metrics(predicted, truth, foregrounds)]
            volumes.append({"volume": stem, "shape": list(image.array.shape),
                            "spacing_mm": [round(float(s), 6) for s in image.spacing]})
            progress.update(1)

    name = slug(data.resolve().name) + "-volumes" + (f"-labels{'-'.join(map(str, merging))}" if merging else "")
    name += (f"-L{level}" if level else "") + plan_suffix(plan)
    name += decision_suffix(threshold, threshold_source, tuned, postprocessing, recipe_postprocessing)
    final = check_output_folder(run.eval_dir(name), "output folder", MOVE_ASIDE)
    spacing = {"source": "each image volume's header (voxel spacing along X, Y, Z, in mm)",
               "xyz_mm": sorted({tuple(v["spacing_mm"]) for v in volumes})}
    info = report_record(
        protocol, summarize_volumes(rows), len(pairs), "all", data, spacing,
        run=str(run.path.resolve()), model={**model_record(predictor.config), "level": level},
        slicing=slicing.to_dict(), labels={"merged": list(merging) if merging else None,
                                           "compared": labels_record(predictor.num_classes, merging),
                                           "foregrounds": [f.name for f in foregrounds]},
        numeric=predictor.mode.to_dict(), inference=plan.to_dict(),
        decision={"threshold": threshold, "threshold_source": threshold_source,
                  "postprocess": postprocessing.to_dict(), "applies_to": "every slice of the predicted volumes"},
        volumes=volumes, per_slice="per_slice.csv" if per_slice else None)
    with user_write_errors(), atomic_folder(final, replace=True) as tmp:
        (tmp / "per_volume.csv").write_text(_csv(rows, ["volume", "labels", *VOLUME_METRICS, "reference_voxels",
                                                        "predicted_voxels"]))
        if per_slice:
            (tmp / "per_slice.csv").write_text(_csv(slice_rows, ["volume", "labels", "slice", *SLICE_METRICS,
                                                                 "reference_voxels", "predicted_voxels"]))
        (tmp / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "report.md").write_text(report_text(info, rows))
    return final


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([f"{row[c]:.6f}" if isinstance(row[c], float) else row[c] for c in columns])
    return buffer.getvalue()


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def report_text(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """report.md: what was scored, the summary table and the best and worst volumes by Dice."""
    protocol, model = info["protocol"], info["model"]
    slicing = info["slicing"]
    window = f"window {slicing['window'][0]:g}..{slicing['window'][1]:g}" if slicing["window"] else \
        "per-volume min-max"
    lines = [f"# Evaluation: {Path(info['run']).name} on the volumes of {Path(info['data']).name}", ""]
    if info["synthetic"]:
        lines += ["**The data are SYNTHETIC** (medseg's generated phantom), not patient images.", ""]
    lines += [f"- model: {model.get('name')} ({model.get('checkpoint', '?')}), recipe {model.get('recipe', '?')}",
              f"- volumes: {info['cases']}; data: `{info['data']}`",
              f"- slicing: {slicing['mode']}" + (f", {slicing['edge']} edges" if slicing["edge"] else "")
              + f", {window}, across voxel axis {slicing['axis']}",
              f"- compared: {info['labels']['compared']}",
              f"- spacing: {info['spacing']['source']}; values {info['spacing']['xyz_mm']}",
              f"- protocol **{protocol['name']}**: {protocol['description']}"]
    lines += [f"  - `{metric}`: {meaning}" for metric, meaning in protocol["definitions"].items()]
    lines += [f"  both empty: {protocol['empty_rules']['both_empty']}; one empty: "
              f"{protocol['empty_rules']['one_empty']}",
              "", "| metric | mean | std | median | n | n_nan |", "|---|---|---|---|---|---|"]
    for metric, values in info["metrics"].items():
        cells = [_number(values.get(key)) for key in ("value", "std", "median")]
        lines.append(f"| {metric} | {' | '.join(cells)} | {values['n']} | {values['n_nan']} |")
    lines += ["", "## Volumes, worst and best by Dice", "",
              "| volume | labels | Dice | IoU | HD95 (mm) | ASSD (mm) | reference voxels | predicted voxels |",
              "|---|---|---|---|---|---|---|---|"]
    for row in _worst_and_best(rows):
        lines.append(f"| {row['volume']} | {row['labels']} | {_number(row['dice'])} | {_number(row['iou'])} | "
                     f"{_number(row['hd95_mm'], 2)} | {_number(row['assd_mm'], 2)} | {row['reference_voxels']} | "
                     f"{row['predicted_voxels']} |")
    lines += ["", "Per-volume numbers: `per_volume.csv`"
              + (f"; per slice: `{info['per_slice']}`" if info["per_slice"] else "")
              + f"; all definitions: `summary.json`. Written {info['created']}."]
    return "\n".join(lines) + "\n"


def _worst_and_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The SHOWN worst then SHOWN best rows by Dice (NaN, both empty, ranks as neither), each row once."""
    scored = sorted((r for r in rows if not math.isnan(r["dice"])), key=lambda r: r["dice"])
    chosen = scored[:SHOWN] + scored[-SHOWN:][::-1]
    return list({id(r): r for r in chosen}.values())
