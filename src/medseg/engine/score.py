"""`medseg score`: score a folder of predictions against a data folder's masks, and the report that evaluate
writes too (per_case.csv, summary.json, report.md, overlays/), so both say the same in the same format.

Predictions are matched to the data's cases by stem, in the names `medseg predict` writes:
- `<stem>_prob.{png,tif,tiff,npy}` (binary) or `<stem>_prob_c<k>.*` for every class k >= 1 (multi-class): a
  probability map, 8/16-bit (value / 255 or / 65535) or float in [0, 1];
- `<stem>.{png,tif,tiff,npy}`: a label map (binary 0/255 or 0/1; multi-class the labels 0..K-1). For a binary
  task a file holding other values is read as a probability map (float in [0, 1], or value / dtype range).
When both are present (predict --probabilities), the label map is the decision (predict's threshold and
post-processing) for the label metrics (confusion, surface, layer distance) and the probability map feeds the map
metrics (pranet, m2snet); so a folder of predict's outputs scores exactly what evaluate reports for the same run,
as long as predict ran at the protocol's threshold (8-bit maps are rounded as the map protocols round them).
With a map alone the protocol's threshold decides; with a label map alone the map metrics see the 0/1 map.

Pixel spacing (HD95, ASSD, NSD): 1 (pixels) by default, `--spacing S` or `ROW,COLUMN` in any unit, or
`--spacing file`: each mask's recorded resolution (PNG pHYs, TIFF resolution tags) in mm. 2D slices carry no
spacing of their volume, so `file` is only as good as the masks' metadata; summary.json records what was used.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.check import check_data
from medseg.data.dataset import load_labels
from medseg.data.formats import Case, discover, load_case
from medseg.data.io import file_error, pixel_spacing, read_mask, read_raw_image, scale_to_unit, write_image_atomic
from medseg.data.splits import SPLIT_NAMES, cases_for, read_splits
from medseg.engine.inference import overlay
from medseg.engine.run import now
from medseg.errors import MedsegError
from medseg.files import atomic_folder, check_output_folder, user_write_errors
from medseg.metrics import get_protocol, predict_labels
from medseg.models.saving import read_model_config

PREDICTION_EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
OVERLAY_MIN_SIDE = 256
DEFAULT_PROTOCOL = "paper"  # the recipes' default eval.protocol
SHOWN = 5  # missing cases named in the one-line error


def parse_spacing(text: str | None) -> tuple[float, float] | str | None:
    """--spacing: None (1, pixels), 'file', one number (square pixels) or ROW,COLUMN."""
    if text is None or str(text).strip() == "":
        return None
    text = str(text).strip()
    if text.lower() == "file":
        return "file"
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or not all(math.isfinite(v) and v > 0 for v in values):
        raise MedsegError(f"--spacing takes one positive number (square pixels), two as ROW,COLUMN (e.g. 0.5,0.8) "
                          f"or 'file' (each mask's recorded resolution); got {text!r}")
    return (values[0], values[-1])


def case_spacing(spacing: tuple[float, float] | str | None, case: Case) -> tuple[float, float]:
    """The (row, column) spacing of one case under --spacing; `file` reads the mask's recorded resolution."""
    if spacing is None:
        return (1.0, 1.0)
    if spacing != "file":
        return spacing
    found = pixel_spacing(case.mask)
    if found is None:
        raise MedsegError(f"--spacing file: mask {case.mask} records no resolution (PNG pHYs or TIFF resolution in "
                          "inch or cm); give the spacing as --spacing ROW,COLUMN")
    return found


def spacing_record(spacing: tuple[float, float] | str | None, used: list[tuple[float, float]]) -> dict[str, Any]:
    """What summary.json says about the spacing: its source and the distinct (row, column) values used."""
    if spacing is None:
        source = "default (1: distances in pixels)"
    else:
        source = "each mask's recorded resolution, in mm" if spacing == "file" else "--spacing"
    return {"source": source, "row_column": sorted({tuple(round(v, 9) for v in s) for s in used})}


# --- the report shared with evaluate ---------------------------------------------------------------------------


def overlay_cases(stems: list[str], scores: list[float] | None, count: int) -> list[str]:
    """The `count` cases to picture: half the worst and half the best by the protocol's main score
    (all when count < 0)."""
    ranked = [(-1.0 if math.isnan(v) else v) for v in (scores or [0.0] * len(stems))]
    order = sorted(range(len(stems)), key=lambda i: (ranked[i], stems[i]))  # worst first
    if count < 0 or count >= len(stems):
        return [stems[i] for i in order]
    worst, best = order[: (count + 1) // 2], order[len(order) - count // 2:]
    return [stems[i] for i in dict.fromkeys(worst + best)]


def write_overlay(path: Path, image: np.ndarray, labels: np.ndarray, truth: np.ndarray) -> None:
    """Prediction tinted over the image (H, W, C in [0, 1]), annotation outlined; small images enlarged."""
    picture = overlay(image, labels, truth)
    zoom = -(-OVERLAY_MIN_SIDE // max(picture.shape[:2]))  # small images are enlarged (nearest) to be seen
    if zoom > 1:
        picture = picture.repeat(zoom, axis=0).repeat(zoom, axis=1)
    write_image_atomic(path, picture)


def write_per_case(path: Path, stems: list[str], sizes: list[tuple[int, int]], pixels: list[tuple[int, int]],
                   per_case: dict[str, list[float]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["stem", "height", "width", "mask_pixels", "predicted_pixels", *per_case])
    for i, stem in enumerate(stems):
        writer.writerow([stem, *sizes[i], *pixels[i], *(f"{per_case[m][i]:.6f}" for m in per_case)])
    path.write_text(buffer.getvalue())


def model_record(config: dict[str, Any]) -> dict[str, Any]:
    """The model a report names: the keys of its config.json that identify it."""
    return {k: config[k] for k in ("name", "in_channels", "num_classes", "checkpoint", "recipe") if k in config}


def report_record(protocol_def, summary: dict[str, Any], cases: int, split: str, data: Path,
                  spacing: dict[str, Any], **source: Any) -> dict[str, Any]:
    """summary.json of evaluate and score: the protocol, the numbers, what was scored, then `source` (what made
    the predictions: a run and its plan, or a predictions folder)."""
    record = {"protocol": protocol_def.definition(), "metrics": summary, "cases": cases, "split": split,
              "data": str(data.resolve()), **source, "spacing": spacing}
    readme = data / "README.md"
    return {**record, "synthetic": readme.is_file() and "SYNTHETIC" in readme.read_text(), "created": now()}


def write_report(folder: Path, info: dict[str, Any], stems: list[str], sizes: list[tuple[int, int]],
                 pixels: list[tuple[int, int]], per_case: dict[str, list[float]], chosen: list[str],
                 rank_metric: str) -> None:
    """per_case.csv, summary.json (`info`) and report.md into `folder` (the caller's atomic folder)."""
    write_per_case(folder / "per_case.csv", stems, sizes, pixels, per_case)
    (folder / "summary.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "report.md").write_text(report_text(info, stems, per_case, chosen, rank_metric))


def _number(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def report_text(info: dict[str, Any], stems: list[str], per_case: dict[str, list[float]], chosen: list[str],
                rank_metric: str) -> str:
    protocol = info["protocol"]
    if "run" in info:
        title = f"# Evaluation: {Path(info['run']).name} on {Path(info['data']).name} ({info['split']})"
    else:
        title = f"# Score: {Path(info['predictions']).name} on {Path(info['data']).name} ({info['split']})"
    lines = [title, ""]
    if info["synthetic"]:
        lines += ["**The data are SYNTHETIC** (medseg's generated phantom), not patient images.", ""]
    model = info.get("model") or {}
    if model:
        lines.append(f"- model: {model.get('name')} ({model.get('checkpoint', '?')}), "
                     f"recipe {model.get('recipe', '?')}")
    if "predictions" in info:
        lines.append(f"- predictions: `{info['predictions']}` ({info['inputs']})")
    lines += [f"- cases: {info['cases']}", f"- data: `{info['data']}`",
              f"- protocol **{protocol['name']}**: {protocol['description']}"]
    if "threshold" in protocol:
        lines.append(f"  threshold {protocol['threshold']}, aggregation {protocol['aggregation']}, "
                     f"empty rule {protocol['empty']}")
    for metric, meaning in protocol.get("definitions", {}).items():
        lines.append(f"  - `{metric}`: {meaning}")
    if "surface" in protocol:
        surface = protocol["surface"]
        for metric, meaning in surface["definitions"].items():
            lines.append(f"  - `{metric}`: {meaning}")
        lines.append(f"  surface metrics in {surface['units']}; NSD tolerance {surface['nsd_tolerance']}; "
                     f"both empty: {surface['empty_rules']['both_empty']}; one empty: "
                     f"{surface['empty_rules']['one_empty']}")
    if "spacing" in info:
        spacing = info["spacing"]
        lines.append(f"- pixel spacing (row, column): {spacing['source']}, values {spacing['row_column']}")
    lines += ["", "| metric | value | std | median | n |", "|---|---|---|---|---|"]
    for metric, values in info["metrics"].items():
        cells = [_number(values.get(key)) for key in ("value", "std", "median")]
        lines.append(f"| {metric} | {' | '.join(cells)} | {values['n']} |")
    if chosen:
        index = {s: i for i, s in enumerate(stems)}
        lines += ["", "## Overlays", "",
                  f"Prediction (at {info.get('decision', {}).get('threshold', 0.5):g}) tinted red, annotation "
                  "outlined green (worst cases first).", ""]
        rank = rank_metric if rank_metric in per_case else next(iter(per_case))
        for stem in chosen:
            lines += [f"**{stem}**: {rank} {per_case[rank][index[stem]]:.3f}", "",
                      f"![{stem}](overlays/{stem}.png)", ""]
    lines += ["", f"Per-case numbers: `per_case.csv`; all definitions: `summary.json`. Written {info['created']}."]
    return "\n".join(lines) + "\n"


# --- reading a folder of predictions ----------------------------------------------------------------------------


def _read_array(path: Path, what: str) -> np.ndarray:
    """A prediction file as a 2-D array in its stored dtype."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError, OSError, EOFError for damaged files
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise file_error(f"cannot read {what}", path, f": {reason}; save it again with numpy.save") from None
        array = np.squeeze(array)
    else:
        array = read_raw_image(path) if what == "probability map" else read_mask(path)
        array = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if array.ndim != 2 or array.dtype.kind not in "buif":
        raise file_error(what, path, f" is not one 2-D {what} (shape {array.shape}, dtype {array.dtype}); save one "
                         "2-D array per case")
    return array


def _as_probability(array: np.ndarray, path: Path) -> torch.Tensor:
    """8/16-bit values / dtype range, floats as they are; refused outside [0, 1] or not finite."""
    unit = scale_to_unit(array)
    if not np.isfinite(unit).all() or unit.min() < 0 or unit.max() > 1:
        raise file_error("probability map", path, " holds values outside [0, 1] (or NaN); save probabilities in "
                         "[0, 1], or 8-bit as probability x 255")
    return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))


def _is_binary_mask(array: np.ndarray) -> bool:
    values = set(np.unique(array).tolist())
    return values <= {0, 1} or values <= {0, 255}


class PredictionFolder:
    """The prediction files of a folder, by name; reads one case's probabilities and decided labels."""

    def __init__(self, folder: Path, num_classes: int):
        self.folder = folder
        self.num_classes = num_classes
        self.files: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in PREDICTION_EXTENSIONS and not path.name.startswith("."):
                self.files.setdefault(path.stem, []).append(path)

    def _one(self, name: str) -> Path | None:
        found = self.files.get(name, [])
        if len(found) > 1:
            raise MedsegError(f"{self.folder} has {len(found)} predictions named {name} "
                              f"({', '.join(p.name for p in found)}); keep one of them")
        return found[0] if found else None

    def map_names(self, stem: str) -> list[str]:
        if self.num_classes <= 2:
            return [f"{stem}_prob"]
        return [f"{stem}_prob_c{k}" for k in range(1, self.num_classes)]

    def has(self, stem: str) -> bool:
        return stem in self.files or all(name in self.files for name in self.map_names(stem))

    def read(self, stem: str, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """(probabilities (K, H, W), decided labels (H, W) or None, what was read) of one case at the mask's size."""
        maps = [self._one(name) for name in self.map_names(stem)]
        label_file = self._one(stem)
        probabilities = labels = None
        if all(maps):
            planes = [self._checked(_as_probability(_read_array(p, "probability map"), p), p, size) for p in maps]
            if self.num_classes > 2:
                planes.insert(0, (1 - torch.stack(planes).sum(dim=0)).clamp(min=0))
            probabilities = torch.stack(planes)
        if label_file is not None:
            array = _read_array(label_file, "prediction")
            if self.num_classes <= 2 and not _is_binary_mask(array):
                if probabilities is None:  # a binary task's file of other values is a probability map
                    probabilities = self._checked(_as_probability(array, label_file), label_file, size)[None]
                else:
                    raise file_error("prediction", label_file, " is not a binary mask (0/255 or 0/1) although "
                                     f"{maps[0].name} holds the probabilities; remove one of them")
            else:
                labels = self._checked(self._labels(array, label_file), label_file, size)
        if probabilities is None:  # a label map alone: the map metrics see it as a 0/1 map
            classes = max(2, self.num_classes)
            probabilities = torch.nn.functional.one_hot(labels, classes).permute(2, 0, 1).float()
            probabilities = probabilities[-1:] if self.num_classes == 1 else probabilities
            return probabilities, labels, "label map"
        kind = "probability map and label map" if labels is not None else "probability map"
        return probabilities, labels, kind

    def _labels(self, array: np.ndarray, path: Path) -> torch.Tensor:
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise file_error("prediction", path, " holds fractional values but the task has "
                             f"{self.num_classes} classes; save a label map of 0..{self.num_classes - 1}")
        labels = array.astype(np.int64)
        if self.num_classes <= 2:
            labels = (labels > 0).astype(np.int64)
        elif labels.min() < 0 or labels.max() >= self.num_classes:
            raise file_error("prediction", path, f" holds labels outside 0..{self.num_classes - 1}; save the label "
                             "map medseg predict writes")
        return torch.from_numpy(labels)

    @staticmethod
    def _checked(tensor: torch.Tensor, path: Path, size: tuple[int, int]) -> torch.Tensor:
        if tuple(tensor.shape[-2:]) != tuple(size):
            raise file_error("prediction", path, f" is {tensor.shape[-2]}x{tensor.shape[-1]} but its mask is "
                             f"{size[0]}x{size[1]}; predictions must have the image's own size (as medseg predict "
                             "writes them)")
        return tensor


def select_data_cases(data: Path, split: str, splits_file: Path | None) -> list[Case]:
    """The cases of `data` to score: all of them, or a split of `splits_file` (default DATA/splits.json; nnU-Net's
    imagesTs is the test split when there is no file)."""
    layout = discover(data)
    everything = layout.cases + layout.test_cases
    if split == "all":
        return everything
    if split not in SPLIT_NAMES:
        raise MedsegError(f"--split must be one of all, {', '.join(SPLIT_NAMES)}, got {split!r}")
    path = splits_file or data / "splits.json"
    if not path.is_file():
        if split == "test" and layout.test_cases and splits_file is None:
            return layout.test_cases
        raise MedsegError(f"--split {split} needs a splits file: {path} does not exist; give --splits "
                          "RUN/splits.json (a run's splits) or use --split all")
    stems = read_splits(path, {c.stem for c in everything})[split]
    if not stems:
        raise MedsegError(f"the {split} split of {path} is empty; choose another --split")
    return cases_for(layout, stems)


def _predict_manifest(pred_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """predict.json of the folder (or {}) and the config of the model it names (None when unknown or gone)."""
    manifest_file = pred_dir / "predict.json"
    if not manifest_file.is_file():
        return {}, None
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}, None
    try:
        return manifest, read_model_config(manifest.get("model", ""))
    except (MedsegError, OSError, TypeError, ValueError):  # a model folder moved away or damaged: flags decide
        return manifest, None


def score(pred_dir: str | Path, data: str | Path, protocol: str | None = None, split: str = "all",
          splits_file: str | Path | None = None, spacing: str | None = None, out: str | Path | None = None,
          num_classes: int | None = None, overlays: int = 8) -> Path:
    """Score the predictions in `pred_dir` against the masks of `data`; returns the report folder (default
    PRED_DIR/score)."""
    pred_dir, data = Path(pred_dir), Path(data)
    if not pred_dir.is_dir():
        raise MedsegError(f"prediction folder {pred_dir} does not exist or is not a folder; give the --out folder of "
                          "`medseg predict`")
    if overlays < -1:
        raise MedsegError(f"--overlays takes a count of overlay pictures, 0 for none or -1 for all; got {overlays}")
    spacing_choice = parse_spacing(spacing)
    final = check_output_folder(Path(out) if out is not None else pred_dir / "score", "--out")
    manifest, model = _predict_manifest(pred_dir)
    if num_classes is None:
        num_classes = int(model["num_classes"]) if model else 1
    if num_classes < 1:
        raise MedsegError(f"--num-classes must be at least 1, got {num_classes}")
    mask_threshold = model.get("mask_threshold") if model else None
    protocol_def = get_protocol(protocol or DEFAULT_PROTOCOL)
    scorer = protocol_def.scorer(num_classes)
    cases = select_data_cases(data, split, Path(splits_file) if splits_file is not None else None)
    predictions = PredictionFolder(pred_dir, num_classes)
    missing = [c.stem for c in cases if not predictions.has(c.stem)]
    if missing:
        names = ", ".join(missing[:SHOWN]) + (f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else "")
        raise MedsegError(f"{len(missing)} of {len(cases)} cases of {data} have no prediction in {pred_dir} ({names}); "
                          "predict them, or choose the cases with --split (and --splits)")
    report = check_data(data, num_classes, mask_threshold, stems={c.stem for c in cases})
    if report.errors:
        raise MedsegError(f"{data}: {report.errors[0].line()} — run `medseg check-data {data}` to see all problems")

    stems, sizes, pixels, used, kinds = [], [], [], [], {}
    for case in cases:
        truth = load_labels(case, num_classes, mask_threshold)
        size = tuple(truth.shape)
        probabilities, labels, kind = predictions.read(case.stem, size)
        case_space = case_spacing(spacing_choice, case)
        scorer.add(probabilities, truth, labels=labels, spacing=case_space)
        shown = labels if labels is not None else predict_labels(probabilities[None], 0.5)[0]
        stems.append(case.stem)
        sizes.append(size)
        pixels.append((int((truth > 0).sum()), int((shown > 0).sum())))
        used.append(case_space)
        kinds[kind] = kinds.get(kind, 0) + 1
    per_case, summary = scorer.per_case(), scorer.summary()
    info = report_record(protocol_def, summary, len(stems), split, data, spacing_record(spacing_choice, used),
                         predictions=str(pred_dir.resolve()), inputs=kinds,
                         model=model_record(model) if model else None, predict_settings=manifest.get("settings"),
                         num_classes=num_classes)
    by_stem = {c.stem: c for c in cases}
    with user_write_errors(), atomic_folder(final, replace=True) as tmp:
        chosen = overlay_cases(stems, per_case.get(protocol_def.rank_metric), overlays)
        for stem in chosen:  # read again: keeping every label map in memory would not scale
            truth = load_labels(by_stem[stem], num_classes, mask_threshold)
            probabilities, labels, _ = predictions.read(stem, tuple(truth.shape))
            shown = labels if labels is not None else predict_labels(probabilities[None], 0.5)[0]
            write_overlay(tmp / "overlays" / f"{stem}.png", load_case(by_stem[stem]), shown.numpy(), truth.numpy())
        write_report(tmp, info, stems, sizes, pixels, per_case, chosen, protocol_def.rank_metric)
    return final
