"""The integrity report behind `medseg check-data DATA`: every problem of a dataset, found in one pass.

Each case is decoded in full (a truncated JPEG only fails when its last rows are decoded), in a thread
pool: Pillow and tifffile release the GIL while decoding, so threads scale without copying arrays
between processes.

A per-file problem's message does not name its file, and what differs from file to file (sizes, counts, link
targets) is in its `detail`: so `DataReport.groups()` gathers the files that share one problem, and a folder of a
thousand images with one mistake reads as one line.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.formats import BROKEN_LINK, NNUNET, NOT_2D, SUBFOLDER, Case, Layout, discover
from medseg.data.io import (
    IMAGE_EXTENSIONS,
    JPEG_EXTENSIONS,
    NON_FINITE_ADVICE,
    RECIPE_KEYS,
    SettingNames,
    count_non_finite,
    distinct_values,
    grouped_mask_values_message,
    mask_to_labels,
    non_2d_format,
    read_mask,
    read_raw_image,
    unexpected_mask_values,
)
from medseg.data.splits import read_splits
from medseg.errors import MedsegError
from medseg.progress import track

ERROR = "error"
WARNING = "warning"
INFO = "info"
LEVELS = (ERROR, WARNING, INFO)
# More threads than this only add memory: decoding is bound by the cores, not by waiting.
MAX_DEFAULT_WORKERS = 16


@dataclass(frozen=True)
class Problem:
    """One finding: `file` is relative to the data root, `message` says what is wrong and what to do (without
    naming the file), `detail` what is particular to this file ("mask 32x32, image 64x64")."""

    level: str
    kind: str
    file: str
    message: str
    detail: str = ""

    @property
    def where(self) -> str:
        """The file, with its detail: "masks/a.png [mask 32x32, image 64x64]"."""
        return f"{self.file} [{self.detail}]" if self.detail else self.file

    def line(self) -> str:
        return self.message if self.file == "." else f"{self.where}: {self.message}"  # "." is the whole folder


@dataclass(frozen=True)
class ProblemGroup:
    """The problems with one level, kind and message: one mistake, found in `len(problems)` files."""

    level: str
    kind: str
    message: str
    problems: tuple[Problem, ...]

    def line(self, shown: int = 3) -> str:
        """"masks/a.png: message", or "1000 files (masks/a.png, masks/b.png, masks/c.png, ...): message"."""
        if len(self.problems) == 1:
            return self.problems[0].line()
        files = ", ".join(p.where for p in self.problems[:shown]) + (", ..." if len(self.problems) > shown else "")
        return f"{len(self.problems)} files ({files}): {self.message}"


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

    def groups(self) -> list[ProblemGroup]:
        """The problems grouped by (level, kind, message): errors first, then warnings, then infos."""
        return group_problems(self.problems)


def group_problems(problems: list[Problem]) -> list[ProblemGroup]:
    """Problems grouped by (level, kind, message): errors first, then warnings, then infos."""
    grouped: dict[tuple[str, str, str], list[Problem]] = {}
    for problem in problems:
        grouped.setdefault((problem.level, problem.kind, problem.message), []).append(problem)
    groups = [ProblemGroup(*key, tuple(members)) for key, members in grouped.items()]
    return sorted(groups, key=lambda g: (LEVELS.index(g.level), g.kind, g.problems[0].file, g.message))


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


def _unreadable(exc: MedsegError, rel: str) -> Problem:
    return Problem(ERROR, "unreadable", rel, getattr(exc, "without_path", str(exc)))


def _size(size: tuple[int, ...]) -> str:
    return f"{size[0]}x{size[1]}"


def _check_images(case: Case, root: Path, found: _CaseFindings) -> None:
    first_size: tuple[int, int] | None = None
    channels = 0
    for path in case.images:
        rel = _relative(path, root)
        try:
            pixels = read_raw_image(path)
        except MedsegError as exc:
            found.problems.append(_unreadable(exc, rel))
            channels = None
            continue
        size = pixels.shape[:2]
        if first_size is None:
            first_size = size
        elif size != first_size:
            found.problems.append(
                Problem(ERROR, "size-mismatch", rel, "channel file differs in size from the case's first channel "
                        "file; all channel files of a case must have one size",
                        f"{_size(size)}, {_relative(case.images[0], root)} {_size(first_size)} (H x W)")
            )
        if channels is not None:
            channels += pixels.shape[2]
        found.dtypes.append(str(pixels.dtype))
        if pixels.dtype.itemsize == 2 and np.issubdtype(pixels.dtype, np.integer):
            found.problems.append(
                Problem(INFO, "bit-depth", rel, "16-bit image: intensities are divided by 65535 (the dtype range), "
                        "not by the image's own maximum")
            )
        non_finite = count_non_finite(pixels)
        if non_finite:  # NaN compares false with everything: the range test below would pass it
            found.problems.append(
                Problem(ERROR, "non-finite", rel, f"floating-point image has NaN or Inf pixels; {NON_FINITE_ADVICE}",
                        f"{non_finite} of {pixels.size} pixels")
            )
        elif np.issubdtype(pixels.dtype, np.floating) and pixels.size and (pixels.min() < 0 or pixels.max() > 1):
            found.problems.append(
                Problem(WARNING, "intensity-range", rel, "floating-point image with values outside [0, 1] is used "
                        "as is; rescale it to [0, 1]", f"values in [{pixels.min():.4g}, {pixels.max():.4g}]")
            )
    if channels is not None and case.channels is not None and channels != case.channels:
        rel = _relative(case.images[0], root)
        found.problems.append(Problem(ERROR, "channel-count", rel, f"decodes to {channels} channel(s) but dataset.json "
                                      f"lists {case.channels}; save it as an RGB image, or give one file per channel "
                                      "(_0000, _0001, _0002)"))
    found.size = first_size
    found.channels = channels
    found.image_file = _relative(case.images[0], root)


def _check_mask(case: Case, root: Path, num_classes: int, mask_threshold: int | None, names: SettingNames,
                found: _CaseFindings) -> None:
    rel = _relative(case.mask, root)
    if case.mask.suffix.lower() in JPEG_EXTENSIONS:
        found.problems.append(
            Problem(WARNING, "mask-format", rel,
                    "mask is a JPEG: compression changes label values near edges; save masks as PNG "
                    f"(or set {names.mask_threshold})")
        )
    try:
        raw = read_mask(case.mask)
    except MedsegError as exc:
        found.problems.append(_unreadable(exc, rel))
        return
    if found.size is not None and raw.shape != found.size:
        found.problems.append(
            Problem(ERROR, "size-mismatch", rel, "mask differs in size from its image; save the mask at its "
                    "image's size", f"mask {_size(raw.shape)}, {found.image_file} {_size(found.size)} (H x W)")
        )
    found.mask_values = [int(v) for v in distinct_values(raw)]
    bad = unexpected_mask_values(raw, num_classes, mask_threshold)
    if bad:
        found.problems.append(Problem(ERROR, "mask-values", rel, *grouped_mask_values_message(bad, num_classes, names)))
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


def _check_case(case: Case, root: Path, num_classes: int, mask_threshold: int | None,
                names: SettingNames) -> _CaseFindings:
    found = _CaseFindings()
    _check_images(case, root, found)
    if case.mask is not None:
        _check_mask(case, root, num_classes, mask_threshold, names, found)
    return found


def _layout_problems(layout: Layout, stems: set[str] | None) -> list[Problem]:
    """Pairing problems and strays that `discover` already found (no decoding needed)."""
    wanted = (lambda path: True) if stems is None else (lambda path: layout.stem_of(path) in stems)
    problems = []
    for kind, paths, default in (("unpaired-image", layout.unpaired_images, "image has no mask"),
                                 ("unpaired-mask", layout.unpaired_masks, "mask has no image")):
        for path in filter(wanted, paths):
            problems.append(Problem(ERROR, kind, _relative(path, layout.root),
                                    f"{layout.notes.get(path, default)}; add the missing file or move this one out of "
                                    "the dataset", layout.details.get(path, "")))
    for stem, paths in layout.duplicate_stems.items():
        if stems is not None and stem not in stems:
            continue
        for path in paths:
            others = ", ".join(_relative(other, layout.root) for other in paths if other != path)
            problems.append(Problem(ERROR, "duplicate-stem", _relative(path, layout.root),
                                    "another file has the same name but another extension, so the pairing is "
                                    "ambiguous; keep one of them", f"also {others}"))
    for path, kind in layout.strays.items():
        if wanted(path):
            problems.append(_stray_problem(layout, path, kind))
    return problems


def _stray_problem(layout: Layout, path: Path, kind: str) -> Problem:
    """What to tell about an entry of a data folder that is not a data file (see formats.BROKEN_LINK)."""
    rel = _relative(path, layout.root)
    data_files = "the dataset's file_ending" if layout.kind == NNUNET else ", ".join(IMAGE_EXTENSIONS)
    if kind == BROKEN_LINK:
        return Problem(ERROR, "broken-link", rel, "broken symbolic link: its target does not exist, so this file is "
                       "missing from the dataset; fix the link, or replace it by the file", f"-> {os.readlink(path)}")
    if kind == SUBFOLDER:
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            return Problem(ERROR, "not-a-file", rel, "a folder named like an image file, so this file is missing "
                           "from the dataset; move the folder out and put the file in its place")
        return Problem(INFO, "ignored", rel, "sub-folder ignored: medseg reads only the files directly in its "
                       "data folders")
    if kind == NOT_2D:
        return Problem(WARNING, "not-2d", rel, f"ignored: the file is {non_2d_format(path)}")
    return Problem(INFO, "ignored", rel, f"ignored: not an image medseg reads ({data_files})")


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
        # a case refused for its channel count (an nnU-Net RGB case) is not told medseg would convert it
        if f.channels is not None and f.channels != usual and all(p.kind != "channel-count" for p in f.problems)
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
    names: SettingNames = RECIPE_KEYS,
    progress: bool = False,
) -> DataReport:
    """Check a dataset and report every problem at once (pairing, readability, sizes, mask values).

    `stems` restricts the check to those cases (e.g. the stems of a split); a listed stem that the
    dataset does not have is an error. `workers` threads decode cases (default: one per core, at most 16).
    `names`: how messages name the mask settings (recipe keys, or `medseg check-data`'s flags). `progress` shows
    a bar on a terminal, periodic lines otherwise (`medseg.progress`).
    """
    layout = discover(root)
    cases = [c for c in layout.cases + layout.test_cases if stems is None or c.stem in stems]
    problems = _layout_problems(layout, stems)
    if stems is not None:
        known = {c.stem for c in layout.cases + layout.test_cases} | set(layout.duplicate_stems)
        known |= {layout.stem_of(p) for p in [*layout.unpaired_images, *layout.unpaired_masks, *layout.strays]}
        problems += [
            Problem(ERROR, "missing-case", stem, "case is listed but the folder has no image or mask with that stem; "
                    "fix the list (e.g. splits.json) or add the files")
            for stem in sorted(stems - known)
        ]
    elif not layout.cases and not layout.test_cases:
        volumes = [path for path, kind in layout.strays.items() if kind == NOT_2D]
        if volumes:  # the usual reason: 3D data given to a 2D tool
            message = (f"no image/mask pairs in the folder, only {len(volumes)} file(s) like "
                       f"{_relative(volumes[0], layout.root)}, {non_2d_format(volumes[0])}")
        else:
            message = "no image/mask pairs in the folder; put images and masks with matching file names in it"
        problems.append(Problem(ERROR, "no-cases", ".", message))

    if stems is None and (layout.root / "splits.json").is_file():  # training would read it: check it now
        try:
            read_splits(layout.root / "splits.json", {c.stem for c in layout.cases + layout.test_cases})
        except MedsegError as exc:
            problems.append(Problem(ERROR, "splits", "splits.json", str(exc)))

    n_workers = workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        findings = pool.map(lambda case: _check_case(case, layout.root, num_classes, mask_threshold, names), cases)
        findings = list(track(findings, "check-data", len(cases), "cases") if progress and cases else findings)
    for found in findings:
        problems += found.problems
    problems += _channel_problems(findings)
    problems.sort(key=lambda p: (p.file, p.kind, p.message))
    return DataReport(root=layout.root, kind=layout.kind, n_cases=len(cases), problems=problems, stats=_stats(findings))


def _check_input_image(path: Path, in_channels: int) -> list[Problem]:
    """Why one image cannot be fed to a network of `in_channels` channels (an empty list when it can)."""
    try:
        pixels = read_raw_image(path)
    except MedsegError as exc:
        return [_unreadable(exc, str(path))]
    non_finite = count_non_finite(pixels)
    if non_finite:
        return [Problem(ERROR, "non-finite", str(path), f"floating-point image has NaN or Inf pixels; "
                        f"{NON_FINITE_ADVICE}", f"{non_finite} NaN or Inf pixel(s) of {pixels.size}")]
    have = pixels.shape[2]
    if have != in_channels and {have, in_channels} != {1, 3}:
        return [Problem(ERROR, "channels", str(path), f"image has {have} channel(s) but the network takes "
                        f"{in_channels}, and medseg converts only between gray (1) and RGB (3); give images with "
                        f"{in_channels} channel(s)")]
    return []


def check_images(paths: list[Path], in_channels: int, workers: int | None = None) -> list[Problem]:
    """Every reason the images `paths` cannot be fed to a network of `in_channels` input channels (unreadable,
    empty, a volume, NaN pixels, a channel count medseg cannot convert), each image decoded in full in a thread
    pool, as `check_data` does; problems name the paths as given. What `medseg predict` checks before it writes."""
    n_workers = workers or min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        found = list(pool.map(lambda path: _check_input_image(path, in_channels), paths))
    return [problem for problems in found for problem in problems]
