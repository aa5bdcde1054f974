"""The integrity report behind `medseg check-data DATA`: every problem of a dataset, found in one pass.

Each case is decoded in full (a truncated JPEG only fails when its last rows are decoded), in a thread
pool: Pillow and tifffile release the GIL while decoding, so threads scale without copying arrays
between processes.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.formats import Case, Layout, discover
from medseg.data.io import (
    JPEG_EXTENSIONS,
    distinct_values,
    mask_to_labels,
    mask_values_message,
    read_mask,
    read_raw_image,
    unexpected_mask_values,
)
from medseg.errors import MedsegError

ERROR = "error"
WARNING = "warning"
INFO = "info"
# More threads than this only add memory: decoding is bound by the cores, not by waiting.
MAX_DEFAULT_WORKERS = 16


@dataclass(frozen=True)
class Problem:
    """One finding: `file` is relative to the data root, `message` says what is wrong and what to do."""

    level: str
    kind: str
    file: str
    message: str


@dataclass
class DataReport:
    """Everything `check_data` found, plus summary statistics of the dataset."""

    root: Path
    kind: str
    n_cases: int
    problems: list[Problem]
    stats: dict

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == WARNING]

    @property
    def infos(self) -> list[Problem]:
        return [p for p in self.problems if p.level == INFO]

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class _CaseFindings:
    """What decoding one case taught us; None where the file could not be read."""

    problems: list[Problem] = field(default_factory=list)
    size: tuple[int, int] | None = None
    channels: int | None = None
    image_file: str = ""
    dtypes: list[str] = field(default_factory=list)
    mask_values: list[int] | None = None
    foreground: float | None = None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _check_images(case: Case, root: Path, found: _CaseFindings) -> None:
    first_size: tuple[int, int] | None = None
    channels = 0
    for path in case.images:
        rel = _relative(path, root)
        try:
            pixels = read_raw_image(path)
        except MedsegError as exc:
            found.problems.append(Problem(ERROR, "unreadable", rel, str(exc)))
            channels = None
            continue
        size = pixels.shape[:2]
        if first_size is None:
            first_size = size
        elif size != first_size:
            found.problems.append(
                Problem(
                    ERROR,
                    "size-mismatch",
                    rel,
                    f"channel file is {size[0]}x{size[1]} but {_relative(case.images[0], root)} is "
                    f"{first_size[0]}x{first_size[1]} (H x W); all channel files of a case must have one size",
                )
            )
        if channels is not None:
            channels += pixels.shape[2]
        found.dtypes.append(str(pixels.dtype))
        if pixels.dtype.itemsize == 2 and np.issubdtype(pixels.dtype, np.integer):
            found.problems.append(
                Problem(INFO, "bit-depth", rel, "16-bit image: intensities are divided by 65535 (the dtype range), "
                        "not by the image's own maximum")
            )
        if np.issubdtype(pixels.dtype, np.floating) and pixels.size and (pixels.min() < 0 or pixels.max() > 1):
            found.problems.append(
                Problem(WARNING, "intensity-range", rel,
                        f"floating-point image with values in [{pixels.min():.4g}, {pixels.max():.4g}] is used as is; "
                        f"rescale it to [0, 1]")
            )
    found.size = first_size
    found.channels = channels
    found.image_file = _relative(case.images[0], root)


def _check_mask(case: Case, root: Path, num_classes: int, mask_threshold: int | None, found: _CaseFindings) -> None:
    rel = _relative(case.mask, root)
    if case.mask.suffix.lower() in JPEG_EXTENSIONS:
        found.problems.append(
            Problem(WARNING, "mask-format", rel,
                    "mask is a JPEG: compression changes label values near edges; save masks as PNG "
                    "(or set data.mask_threshold)")
        )
    try:
        raw = read_mask(case.mask)
    except MedsegError as exc:
        found.problems.append(Problem(ERROR, "unreadable", rel, str(exc)))
        return
    if found.size is not None and raw.shape != found.size:
        found.problems.append(
            Problem(
                ERROR,
                "size-mismatch",
                rel,
                f"mask is {raw.shape[0]}x{raw.shape[1]} but its image {found.image_file} is "
                f"{found.size[0]}x{found.size[1]} (H x W); save the mask at its image's size",
            )
        )
    found.mask_values = [int(v) for v in distinct_values(raw)]
    bad = unexpected_mask_values(raw, num_classes, mask_threshold)
    if bad:
        found.problems.append(Problem(ERROR, "mask-values", rel, mask_values_message(rel, bad, num_classes)))
        return
    labels = mask_to_labels(raw, num_classes, mask_threshold, rel)
    found.foreground = np.count_nonzero(labels) / labels.size if labels.size else 0.0
    if found.foreground == 0:
        found.problems.append(
            Problem(INFO, "empty-mask", rel, "mask has no foreground (fine for negative examples; "
                    "check it is not a failed export)")
        )
    elif found.foreground == 1:
        found.problems.append(
            Problem(WARNING, "full-mask", rel, "mask is foreground everywhere; check it is not inverted "
                    "(foreground must be the non-zero value)")
        )


def _check_case(case: Case, root: Path, num_classes: int, mask_threshold: int | None) -> _CaseFindings:
    found = _CaseFindings()
    _check_images(case, root, found)
    if case.mask is not None:
        _check_mask(case, root, num_classes, mask_threshold, found)
    return found


def _layout_problems(layout: Layout, stems: set[str] | None) -> list[Problem]:
    """Pairing problems that `discover` already found (no decoding needed)."""
    wanted = (lambda path: True) if stems is None else (lambda path: layout.stem_of(path) in stems)
    problems = []
    for path in filter(wanted, layout.unpaired_images):
        note = layout.notes.get(path, "image has no mask")
        problems.append(Problem(ERROR, "unpaired-image", _relative(path, layout.root),
                                f"{note}; add the missing file or move this one out of the dataset"))
    for path in filter(wanted, layout.unpaired_masks):
        note = layout.notes.get(path, "mask has no image")
        problems.append(Problem(ERROR, "unpaired-mask", _relative(path, layout.root),
                                f"{note}; add the missing file or move this one out of the dataset"))
    for stem, paths in layout.duplicate_stems.items():
        if stems is not None and stem not in stems:
            continue
        names = ", ".join(_relative(path, layout.root) for path in paths)
        for path in paths:
            problems.append(Problem(ERROR, "duplicate-stem", _relative(path, layout.root),
                                    f"files {names} share the stem {stem!r}; keep one of them"))
    return problems


def _channel_problems(findings: list[_CaseFindings]) -> list[Problem]:
    """Images whose channel count differs from the dataset's most common one."""
    counts = Counter(f.channels for f in findings if f.channels is not None)
    if len(counts) < 2:
        return []
    usual, usual_count = counts.most_common(1)[0]
    return [
        Problem(WARNING, "channels", f.image_file,
                f"image has {f.channels} channel(s) while {usual_count} of {sum(counts.values())} images have "
                f"{usual}; medseg converts gray <-> RGB to model.in_channels, check this is intended")
        for f in findings
        if f.channels is not None and f.channels != usual
    ]


def _stats(findings: list[_CaseFindings]) -> dict:
    sizes = [f.size for f in findings if f.size is not None]
    foregrounds = [f.foreground for f in findings if f.foreground is not None]
    labels_seen = sorted(set().union(*(f.mask_values for f in findings if f.mask_values is not None)))
    return {
        "height": [min(s[0] for s in sizes), max(s[0] for s in sizes)] if sizes else None,
        "width": [min(s[1] for s in sizes), max(s[1] for s in sizes)] if sizes else None,
        "distinct_sizes": len(set(sizes)),
        "channels": dict(sorted(Counter(f.channels for f in findings if f.channels is not None).items())),
        "dtypes": dict(sorted(Counter(d for f in findings for d in f.dtypes).items())),
        "empty_masks": sum(1 for fg in foregrounds if fg == 0),
        "full_masks": sum(1 for fg in foregrounds if fg == 1),
        "mean_foreground_fraction": float(np.mean(foregrounds)) if foregrounds else None,
        "label_values": labels_seen,
    }


def check_data(
    root: str | Path,
    num_classes: int = 1,
    mask_threshold: int | None = None,
    stems: set[str] | None = None,
    workers: int | None = None,
) -> DataReport:
    """Check a dataset and report every problem at once (pairing, readability, sizes, mask values).

    `stems` restricts the check to those cases (e.g. the stems of a split); a listed stem that the
    dataset does not have is an error. `workers` threads decode cases (default: one per core, at most 16).
    """
    layout = discover(root)
    cases = [c for c in layout.cases + layout.test_cases if stems is None or c.stem in stems]
    problems = _layout_problems(layout, stems)
    if stems is not None:
        known = {c.stem for c in layout.cases + layout.test_cases} | set(layout.duplicate_stems)
        known |= {layout.stem_of(p) for p in layout.unpaired_images + layout.unpaired_masks}
        problems += [
            Problem(ERROR, "missing-case", stem, f"case {stem!r} is listed but {layout.root} has no image or mask "
                    f"with that stem; fix the list (e.g. splits.json) or add the files")
            for stem in sorted(stems - known)
        ]
    elif not layout.cases and not layout.test_cases:
        problems.append(Problem(ERROR, "no-cases", ".", f"{layout.root} holds no image/mask pairs; put images and "
                                "masks with matching file names in it"))

    n_workers = workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        findings = list(pool.map(lambda case: _check_case(case, layout.root, num_classes, mask_threshold), cases))
    for found in findings:
        problems += found.problems
    problems += _channel_problems(findings)
    problems.sort(key=lambda p: (p.file, p.kind, p.message))
    return DataReport(root=layout.root, kind=layout.kind, n_cases=len(cases), problems=problems, stats=_stats(findings))
