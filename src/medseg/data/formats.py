"""Finding the image/mask pairs of a dataset: medseg's folder format and nnU-Net's raw 2D layout.

`discover` never raises for problems inside a dataset (unpaired files, duplicate stems, broken links,
files it cannot use): it lists them in the `Layout`, so that `check-data` can report all of them at once.
It raises only when the folder is not a dataset at all, or cannot be listed.

nnU-Net RGB cases: nnU-Net v2 stores a natural 2D image (its NaturalImage2DIO reader) as one `<case>_0000.png`
holding all three colours, while dataset.json lists three channel_names (e.g. R, G, B), since nnU-Net counts
the channels decoded, not the files. medseg's rule: when dataset.json lists exactly the channels 0, 1, 2 and a
case has `_0000` alone, that file is the whole case and must decode to 3 channels (`Case.channels`); a case with
all three files stacks them as usual. A case with some of the three files, or a gray `_0000` alone, is a
problem to report. Other channel counts keep one file per channel: packing is nnU-Net's convention for RGB only.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.io import IMAGE_EXTENSIONS, non_2d_format, read_image
from medseg.errors import MedsegError

FOLDER = "folder"
NNUNET = "nnunet"
NNUNET_REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
# nnU-Net names channel files <case>_<NNNN><file_ending>, NNNN being the 4-digit channel index.
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# The channel ids whose case may also be one RGB `_0000` file (see the module docstring).
_NNUNET_RGB = [0, 1, 2]

# What else a data folder may hold besides its data files (Layout.strays): entries a user may have meant as data.
BROKEN_LINK = "broken-link"  # a symbolic link whose target does not exist
SUBFOLDER = "subfolder"  # medseg reads only the files directly in a data folder
NOT_2D = "not-2d"  # a volume, DICOM or NumPy file (io.non_2d_format says which and what to do)
OTHER_FILE = "other-file"  # any other file: not an image format medseg reads, or not the dataset's file_ending


@dataclass(frozen=True)
class Case:
    """One training example: its image file(s), stacked along channels, and its mask.

    `channels`: how many channels the files must decode to, where the dataset says (an nnU-Net RGB case)."""

    stem: str
    images: tuple[Path, ...]
    mask: Path | None
    channels: int | None = None


@dataclass
class Layout:
    """What `discover` found in a dataset folder, problems included."""

    root: Path
    kind: str
    cases: list[Case]
    test_cases: list[Case]
    unpaired_images: list[Path]
    unpaired_masks: list[Path]
    duplicate_stems: dict[str, list[Path]]
    labels: dict[str, int] | None
    # Why each unpaired file is unpaired, in words shared by every file with that reason ("image has no mask"),
    # and the file's own specifics ("no masks/a.png"), so the report can group files with one reason.
    notes: dict[Path, str] = field(default_factory=dict)
    details: dict[Path, str] = field(default_factory=dict)
    # Entries of the data folders that are not data files: path -> BROKEN_LINK, SUBFOLDER, NOT_2D or OTHER_FILE.
    strays: dict[Path, str] = field(default_factory=dict)

    def stem_of(self, path: Path) -> str:
        """The case stem a file belongs to (nnU-Net channel files drop their _NNNN suffix)."""
        stem = Path(path).stem
        if self.kind == NNUNET and Path(path).parent.name in ("imagesTr", "imagesTs"):
            match = _NNUNET_CHANNEL.match(stem)
            return match["case"] if match else stem
        return stem


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _scan(folder: Path, is_data_name) -> tuple[list[Path], dict[Path, str]]:
    """The data files directly in `folder` (sorted; hidden entries skipped) and its strays (see BROKEN_LINK).

    A broken link or a sub-folder is a stray even when named like a data file: it cannot be read."""
    try:
        entries = sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else " ".join(str(exc).split())
        raise MedsegError(f"cannot list the data folder {folder}: {reason}; make it readable (chmod a+rx)") from exc
    files, strays = [], {}
    for entry in entries:
        if entry.is_symlink() and not entry.exists():
            strays[entry] = BROKEN_LINK
        elif entry.is_dir():
            strays[entry] = SUBFOLDER
        elif entry.is_file() and is_data_name(entry.name):
            files.append(entry)
        else:
            strays[entry] = NOT_2D if non_2d_format(entry) else OTHER_FILE
    return files, strays


def _blocked(strays: dict[Path, str], is_data_name) -> list[Path]:
    """Broken links and folders named like a data file: the stray is the problem to report, so its partner is
    not reported again as unpaired."""
    return [path for path, kind in strays.items() if kind in (BROKEN_LINK, SUBFOLDER) and is_data_name(path.name)]


def _by_stem(files: list[Path]) -> dict[str, list[Path]]:
    grouped: dict[str, list[Path]] = {}
    for file in files:
        grouped.setdefault(file.stem, []).append(file)
    return grouped


def _discover_folder(root: Path) -> Layout:
    image_files, strays = _scan(root / "images", _is_image_name)
    mask_files, mask_strays = _scan(root / "masks", _is_image_name)
    images, masks = _by_stem(image_files), _by_stem(mask_files)
    missing_image_ok = {path.stem for path in _blocked(strays, _is_image_name)}
    missing_mask_ok = {path.stem for path in _blocked(mask_strays, _is_image_name)}
    strays.update(mask_strays)
    duplicates: dict[str, list[Path]] = {}
    for grouped in (images, masks):
        for stem, files in grouped.items():
            if len(files) > 1:
                duplicates.setdefault(stem, []).extend(files)
    # An ambiguous stem is reported once as a duplicate, not again as paired or unpaired.
    cases = [
        Case(stem, (images[stem][0],), masks[stem][0])
        for stem in sorted(images.keys() & masks.keys())
        if stem not in duplicates
    ]
    unpaired_images = [files[0] for stem, files in images.items()
                       if stem not in masks and stem not in duplicates and stem not in missing_mask_ok]
    unpaired_masks = [files[0] for stem, files in masks.items()
                      if stem not in images and stem not in duplicates and stem not in missing_image_ok]
    notes = {path: "image has no mask" for path in unpaired_images}
    notes.update({path: "mask has no image" for path in unpaired_masks})
    details = {path: f"no masks/{path.stem}.png" for path in unpaired_images}
    details.update({path: f"no images/{path.stem}.*" for path in unpaired_masks})
    return Layout(
        root=root,
        kind=FOLDER,
        cases=cases,
        test_cases=[],
        unpaired_images=sorted(unpaired_images),
        unpaired_masks=sorted(unpaired_masks),
        duplicate_stems={stem: sorted(files) for stem, files in sorted(duplicates.items())},
        labels=None,
        notes=notes,
        details=details,
        strays=strays,
    )


def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedsegError(f"cannot read {path}: {exc}; fix the JSON or remove the file") from exc
    if not isinstance(meta, dict):
        raise MedsegError(f"{path} must hold a JSON object with {', '.join(NNUNET_REQUIRED_KEYS)}")
    missing = [key for key in NNUNET_REQUIRED_KEYS if key not in meta]
    if missing:
        raise MedsegError(
            f"{path} lacks {', '.join(missing)}; medseg reads nnU-Net v2 raw datasets, whose dataset.json "
            f"has channel_names, labels and file_ending"
        )
    ending = str(meta["file_ending"])
    if ending.lower() not in IMAGE_EXTENSIONS:
        hint = " (a 3D dataset: `medseg slices` turns it into 2D slices)" if non_2d_format(f"x{ending}") else ""
        raise MedsegError(
            f"{path} has file_ending {ending!r}; medseg reads 2D nnU-Net datasets stored as "
            f"{', '.join(IMAGE_EXTENSIONS)}{hint}"
        )
    labels = meta["labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        raise MedsegError(
            f"{path} has labels that are not name -> integer (region-based labels are not supported); "
            f'write labels as {{"background": 0, "lesion": 1}}'
        )
    channels = meta["channel_names"]
    if not isinstance(channels, dict) or not channels or not all(str(k).isdigit() for k in channels):
        raise MedsegError(f'{path} has channel_names that are not {{"0": "name", ...}}; fix dataset.json')
    return meta


@dataclass
class _Split:
    """One imagesXx/labelsXx folder pair, paired (see `_nnunet_split`)."""

    cases: list[Case] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_labels: list[Path] = field(default_factory=list)
    notes: dict[Path, str] = field(default_factory=dict)
    details: dict[Path, str] = field(default_factory=dict)
    strays: dict[Path, str] = field(default_factory=dict)


def _nnunet_split(
    images_dir: Path, labels_dir: Path, channel_ids: list[int], ending: str, unlabelled_ok: bool
) -> _Split:
    """Pair one imagesXx/labelsXx folder pair.

    `unlabelled_ok`: in imagesTs, images without labels are ordinary inference inputs, not problems.
    """
    def is_data_name(name: str) -> bool:
        return name.lower().endswith(ending.lower())

    def scan(folder: Path) -> tuple[list[Path], dict[Path, str]]:
        return _scan(folder, is_data_name) if folder.is_dir() else ([], {})

    def case_of(path: Path) -> str | None:
        match = _NNUNET_CHANNEL.match(path.name[: -len(ending)])
        return match["case"] if match else None

    split = _Split()
    image_files, split.strays = scan(images_dir)
    label_files, label_strays = scan(labels_dir)
    split.strays.update(label_strays)
    # A broken link or folder named like a case's file is reported itself, not again as an incomplete case.
    blocked_cases = {case_of(path) for path in _blocked(split.strays, is_data_name) if path.parent == images_dir}
    blocked_labels = {path.name[: -len(ending)] for path in _blocked(split.strays, is_data_name)
                      if path.parent == labels_dir}

    channel_files: dict[str, dict[int, Path]] = {}
    for path in image_files:
        match = _NNUNET_CHANNEL.match(path.name[: -len(ending)])
        if match is None or int(match["channel"]) not in channel_ids:
            split.unpaired_images.append(path)
            split.notes[path] = (
                f"not named <case>_NNNN{ending} with NNNN one of the channels "
                f"{', '.join(f'{c:04d}' for c in channel_ids)} in dataset.json"
            )
            continue
        channel_files.setdefault(match["case"], {})[int(match["channel"])] = path
    labels = {path.name[: -len(ending)]: path for path in label_files}

    rgb = channel_ids == _NNUNET_RGB
    for name, found in sorted(channel_files.items()):
        packed = rgb and list(found) == [0]  # one RGB file holds the three channels
        missing = [] if packed else [c for c in channel_ids if c not in found]
        label = labels.get(name)
        if name in blocked_cases:
            continue
        if missing:
            reason, detail = "case lacks channel file(s)", ", ".join(f"no {name}_{c:04d}{ending}" for c in missing)
            if rgb:
                reason += f" (or keep one RGB <case>_0000{ending} alone)"
        elif label is None:
            if unlabelled_ok or name in blocked_labels:
                continue
            reason, detail = "case has no label", f"no {labels_dir.name}/{name}{ending}"
        else:
            files = (found[0],) if packed else tuple(found[c] for c in channel_ids)
            split.cases.append(Case(name, files, label, len(channel_ids) if packed else None))
            continue
        for path in found.values():
            split.unpaired_images.append(path)
            split.notes[path], split.details[path] = reason, detail
    paired = {case.stem for case in split.cases}
    for name, path in sorted(labels.items()):
        if name in paired or name in blocked_cases:
            continue
        split.unpaired_labels.append(path)
        if name in channel_files:
            split.notes[path] = "case is incomplete (see its image files)"
        else:
            split.notes[path], split.details[path] = "label has no image", f"no {images_dir.name}/{name}_NNNN{ending}"
    split.unpaired_images.sort()
    return split


def _discover_nnunet(root: Path) -> Layout:
    meta = _read_dataset_json(root)
    for needed in ("imagesTr", "labelsTr"):
        if not (root / needed).is_dir():
            raise MedsegError(
                f"{root} has dataset.json but no {needed}/ folder; an nnU-Net raw dataset needs "
                f"imagesTr/ and labelsTr/"
            )
    ending = str(meta["file_ending"])
    channel_ids = sorted(int(key) for key in meta["channel_names"])
    train = _nnunet_split(root / "imagesTr", root / "labelsTr", channel_ids, ending, unlabelled_ok=False)
    test = _nnunet_split(root / "imagesTs", root / "labelsTs", channel_ids, ending, unlabelled_ok=True)
    return Layout(
        root=root,
        kind=NNUNET,
        cases=train.cases,
        test_cases=test.cases,
        unpaired_images=sorted(train.unpaired_images + test.unpaired_images),
        unpaired_masks=sorted(train.unpaired_labels + test.unpaired_labels),
        duplicate_stems={},
        labels=dict(meta["labels"]),
        notes={**train.notes, **test.notes},
        details={**train.details, **test.details},
        strays={**train.strays, **test.strays},
    )


def discover(root: str | Path) -> Layout:
    """Find the cases of a dataset in medseg's folder format or nnU-Net's raw 2D layout."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise MedsegError(f"data folder {root} {what}; pass the folder that holds images/ and masks/")
    if (root / "dataset.json").is_file():
        return _discover_nnunet(root)
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return _discover_folder(root)
    for needed in ("images", "masks"):
        if (root / needed).is_symlink() and not (root / needed).exists():
            raise MedsegError(f"{root / needed} is a broken link to {os.readlink(root / needed)} (its target does not "
                              "exist); fix the link or put the folder itself there")
    raise MedsegError(
        f"{root} is not a dataset: expected DATA/images + DATA/masks, or nnU-Net's dataset.json + imagesTr + labelsTr"
        + _volume_hint(root / "images")
    )


def _volume_hint(images: Path) -> str:
    """'; images/x.mha is a NRRD/MetaImage volume ... `medseg slices ...`' when images/ (or a series folder in it)
    holds volumes: the usual reason for a folder without masks/ is a volume folder given to a 2D tool."""
    if not images.is_dir():
        return ""
    for path in sorted(images.iterdir()):
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        advice = next(((f, non_2d_format(f)) for f in files if non_2d_format(f)), None)
        if advice:
            return f"; {advice[0].relative_to(images.parent)} is {advice[1]}"
    return ""


def load_case(case: Case, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """A case's image as float32 (H, W, C): its channel files read and concatenated along channels."""
    parts = [read_image(path, reduce_to) for path in case.images]
    sizes = {part.shape[:2] for part in parts}
    if len(sizes) > 1:
        listing = ", ".join(f"{path.name} {part.shape[0]}x{part.shape[1]}" for path, part in zip(case.images, parts))
        raise MedsegError(
            f"channel files of case {case.stem} differ in size ({listing}); resample them to one size"
        )
    image = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
    if case.channels is not None and image.shape[2] != case.channels:
        raise MedsegError(
            f"{case.images[0]} decodes to {image.shape[2]} channel(s) but dataset.json lists {case.channels} for "
            f"case {case.stem}; save it as an RGB image, or give one file per channel (_0000, _0001, _0002)"
        )
    return image
