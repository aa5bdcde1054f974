"""`medseg check-data VOLUMES` on a folder of volume pairs: the report `check_data` gives a 2D folder,
for the image / label volumes that `medseg slices`, `predict` and `evaluate --data` read.

The papers train on 2D slices and say nothing about checking volumes; what is checked is what `medseg slices`
and `evaluate --data VOLUMES` would otherwise refuse one volume at a time, or silently use (ours):
- pairing (`volumes.pair_volumes`): every image volume with a label volume of its stem, and back; entries of the
  folders that are not volumes are listed as ignored;
- each volume readable (`volume_io.read_volume`: NIfTI, NRRD, MetaImage, DICOM series folders); a series folder
  holding several series is an error naming them, with the `--series` hint;
- image and label of one shape on one voxel grid (`volume_io.same_grid`);
- NaN or Inf voxels (an error in the image as in the label: a network fed them trains to NaN weights);
- label volumes integer-valued and >= 0 (fractional values, e.g. a resampled label, or negative ones are errors;
  with `--num-classes N >= 2` a label >= N too, as train refuses it); the label values present (information);
  a label volume without foreground (warning: `slices --only-lesion` drops all its slices, and an export that
  failed looks the same);
- a summary: volumes, slices (along the slice axis, as `medseg slices` cuts them), shape and spacing ranges per
  voxel axis, the anisotropy (largest over smallest spacing of a volume), image dtypes, the label values.

Problems use `check.Problem` and group as the 2D report does; the messages do not name the file (volume_io's
messages do, for the commands that raise them, so the path is taken out here). Volumes are read in a few threads
(nibabel's gzip and SimpleITK release the GIL); few, because a CT volume and its label take hundreds of MB.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.check import ERROR, INFO, WARNING, DataReport, Problem
from medseg.data.io import NON_FINITE_ADVICE, count_non_finite, distinct_values
from medseg.data.volume_io import Volume, describe_series, read_volume, same_grid, series_ids
from medseg.data.volumes import SLICE_AXIS, pair_volumes
from medseg.errors import MedsegError
from medseg.progress import track

VOLUME_KIND = "volumes"
NNUNET_VOLUME_KIND = "nnunet-volumes"
MAX_WORKERS = 4  # each thread holds an image and a label volume
SHOWN_VALUES = 12


@dataclass
class _PairFindings:
    problems: list[Problem] = field(default_factory=list)
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    dtype: str | None = None
    label_values: list[int] | None = None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _without_path(exc: MedsegError, path: Path) -> str:
    """volume_io's message without the path it names (the report names the file on its own), so that files with
    one problem share one line; a library's message quoting the path keeps only the file's name."""
    # "P: about 2 slices missing", "cannot read volume P: ...", "P holds no DICOM series"
    message = str(exc).replace(f" {path}", "").replace(f"{path}: ", "").replace(f"{path} ", "the folder ")
    return message.replace(str(path), path.name).strip()


def _read(path: Path, rel: str, series: str | None, found: _PairFindings) -> Volume | None:
    """The volume, or None with the reason among `found.problems`."""
    if path.is_dir() and series is None:
        ids = series_ids(path)
        if len(ids) > 1:
            found.problems.append(Problem(ERROR, "dicom-series", rel, "folder holds several DICOM series and medseg "
                                          "reads one; pick it with --series UID (or move the others out)",
                                          describe_series(path, ids)))
            return None
    try:
        return read_volume(path, series)
    except MedsegError as exc:
        found.problems.append(Problem(ERROR, "unreadable", rel, _without_path(exc, path)))
        return None


def _format_values(values: list[int]) -> str:
    shown = ", ".join(map(str, values[:SHOWN_VALUES]))
    return f"{{{shown}, ...}} ({len(values)} distinct)" if len(values) > SHOWN_VALUES else f"{{{shown}}}"


def _check_labels(labels: np.ndarray, rel: str, num_classes: int, found: _PairFindings) -> None:
    non_finite = count_non_finite(labels)
    if non_finite:
        found.problems.append(Problem(ERROR, "non-finite", rel, "label volume has NaN or Inf voxels; save integer "
                                      "labels (0 = background)", f"{non_finite} of {labels.size} voxels"))
        return
    if labels.dtype.kind == "f":
        fractional = int(np.count_nonzero(labels != np.round(labels)))
        if fractional:
            found.problems.append(Problem(ERROR, "label-values", rel, "label volume holds fractional values (a label "
                                          "resampled with linear interpolation?); save integer labels (0 = "
                                          "background), resampling with nearest neighbour",
                                          f"{fractional} of {labels.size} voxels"))
            return
    values = distinct_values(labels) if labels.dtype.kind in "ui" else np.unique(labels)
    found.label_values = [int(v) for v in values]
    negative = [v for v in found.label_values if v < 0]
    if negative:
        found.problems.append(Problem(ERROR, "label-values", rel, "label volume holds negative labels; labels are "
                                      "0 (background) and positive integers", f"values {_format_values(negative)}"))
    too_high = [v for v in found.label_values if num_classes >= 2 and v >= num_classes]
    if too_high:
        found.problems.append(Problem(ERROR, "label-values", rel, f"label volume holds labels >= --num-classes "
                                      f"{num_classes}; raise --num-classes, or merge the labels",
                                      f"values {_format_values(too_high)}"))
    found.problems.append(Problem(INFO, "labels", rel, f"label values {_format_values(found.label_values)}"))
    if all(v == 0 for v in found.label_values):
        found.problems.append(Problem(WARNING, "empty-label", rel, "label volume has no foreground; check it is not "
                                      "a failed export (`medseg slices --only-lesion` keeps none of its slices)"))


def _check_pair(image_path: Path, label_path: Path, root: Path, num_classes: int, series: str | None) -> _PairFindings:
    found = _PairFindings()
    image_rel, label_rel = _relative(image_path, root), _relative(label_path, root)
    image = _read(image_path, image_rel, series, found)
    if image is not None:
        found.shape, found.spacing, found.dtype = image.array.shape, image.spacing, str(image.array.dtype)
        non_finite = count_non_finite(image.array)
        if non_finite:
            found.problems.append(Problem(ERROR, "non-finite", image_rel, f"image volume has NaN or Inf voxels; "
                                          f"{NON_FINITE_ADVICE}", f"{non_finite} of {image.array.size} voxels"))
    label = _read(label_path, label_rel, None, found)
    if label is None:
        return found
    if image is not None:
        if label.array.shape != image.array.shape:
            found.problems.append(Problem(ERROR, "shape-mismatch", label_rel, "label volume differs in shape from its "
                                          "image; save the label on the image's voxel grid",
                                          f"label {label.array.shape}, {image_rel} {image.array.shape}"))
        else:
            differs = same_grid(image, label)
            if differs:
                found.problems.append(Problem(ERROR, "grid-mismatch", label_rel, "label volume lies on another voxel "
                                              "grid than its image; resample the label onto the image (e.g. SimpleITK "
                                              "Resample, nearest neighbour) so voxels pair up",
                                              f"{image_rel} then label: {differs}"))
    _check_labels(label.array, label_rel, num_classes, found)
    return found


def _pairing_problems(pairing, root: Path) -> list[Problem]:
    problems = []
    for kind, paths, message in (
        ("unpaired-image", pairing.unpaired_images, "image volume has no label volume of its name; add the label or "
                                                    "move the image out of the folder"),
        ("unpaired-label", pairing.unpaired_labels, "label volume has no image volume of its name; add the image or "
                                                    "move the label out of the folder"),
    ):
        problems += [Problem(ERROR, kind, _relative(path, root), message) for path in paths]
    what = "imagesTr/<case>_0000" if pairing.nnunet else "images/"
    problems += [Problem(INFO, "ignored", _relative(path, root), f"ignored: not a volume medseg reads (.nii[.gz], "
                         f".nrrd, .nhdr, .mha, .mhd, or a DICOM series folder in {what})")
                 for path in pairing.ignored]
    return problems


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if values else None


def _stats(findings: list[_PairFindings]) -> dict:
    shapes = [f.shape for f in findings if f.shape is not None]
    spacings = [f.spacing for f in findings if f.spacing is not None]
    anisotropy = [max(s) / min(s) for s in spacings if min(s) > 0]
    labels_seen = sorted(set().union(*(f.label_values for f in findings if f.label_values is not None)))
    return {
        "volumes": len(findings),
        "slices": sum(shape[SLICE_AXIS] for shape in shapes),
        "shape": [_range([s[axis] for s in shapes]) for axis in range(3)] if shapes else None,
        "spacing_mm": [_range([s[axis] for s in spacings]) for axis in range(3)] if spacings else None,
        "anisotropy": _range(anisotropy),
        "dtypes": dict(sorted(Counter(f.dtype for f in findings if f.dtype is not None).items())),
        "empty_labels": sum(1 for f in findings if f.label_values is not None and not any(f.label_values)),
        "label_values": labels_seen,
    }


def check_volumes(root: str | Path, num_classes: int = 1, series: str | None = None, workers: int | None = None,
                  progress: bool = False) -> DataReport:
    """Check a folder of volume pairs and report every problem at once (pairing, readability, shapes and grids,
    NaN voxels, label values), in `check_data`'s format. `series`: the DICOM series UID to read in series folders
    that hold several. `num_classes` >= 2 refuses labels >= it; 1 (binary) takes every label > 0 as foreground."""
    root = Path(root)
    try:
        pairing = pair_volumes(root)
    except MedsegError as exc:  # no layout, or two files of one stem: nothing to pair
        return DataReport(root=root, kind=VOLUME_KIND, n_cases=0, problems=[Problem(ERROR, "layout", ".", str(exc))],
                          stats=_stats([]))
    problems = _pairing_problems(pairing, root)
    if not pairing.pairs:
        problems.append(Problem(ERROR, "no-cases", ".", f"{root} holds no image / label volume pairs; put volumes "
                                "of matching names in images/ and labels/"))
    n_workers = max(1, min(workers or os.cpu_count() or 1, MAX_WORKERS))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        findings = pool.map(lambda pair: _check_pair(pair[1], pair[2], root, num_classes, series), pairing.pairs)
        pairs = len(pairing.pairs)
        findings = list(track(findings, "check-data", pairs, "volumes") if progress and pairs else findings)
    for found in findings:
        problems += found.problems
    problems.sort(key=lambda p: (p.file, p.kind, p.message))
    return DataReport(root=root, kind=NNUNET_VOLUME_KIND if pairing.nnunet else VOLUME_KIND,
                      n_cases=len(pairing.pairs), problems=problems, stats=_stats(findings))


def _span(low: float, high: float, spec: str) -> str:
    """"0.8" or "1.5-2.5": one number where the range is one value at the shown precision (float headers)."""
    low_text, high_text = format(low, spec), format(high, spec)
    return low_text if low_text == high_text else f"{low_text}-{high_text}"


def summary_lines(report: DataReport) -> list[str]:
    """The summary `medseg check-data` prints above the problems of a volume folder."""
    stats = report.stats
    pairs = f"{stats['volumes']} volume pair" + ("" if stats["volumes"] == 1 else "s")
    lines = [f"{report.root} ({report.kind} layout): {pairs}, {stats['slices']} slices"]
    if stats["shape"]:
        shape = " x ".join(_span(low, high, "d") for low, high in stats["shape"])
        spacing = " x ".join(_span(low, high, ".3g") for low, high in stats["spacing_mm"])
        low, high = stats["anisotropy"] or (1.0, 1.0)
        lines.append(f"  shape {shape} voxels; spacing {spacing} mm; anisotropy {low:.2g}-{high:.2g}; "
                     f"dtypes {stats['dtypes']}")
    if stats["label_values"]:
        lines.append(f"  labels: values {_format_values(stats['label_values'])}, {stats['empty_labels']} empty")
    return lines
