"""Finding the image/mask pairs of a dataset: medseg's folder format and nnU-Net's raw 2D layout.

`discover` never raises for problems inside a dataset (unpaired files, duplicate stems): it lists them
in the `Layout`, so that `check-data` can report all of them at once. It raises only when the folder is
not a dataset at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseg.data.io import IMAGE_EXTENSIONS, read_image
from medseg.errors import MedsegError

FOLDER = "folder"
NNUNET = "nnunet"
NNUNET_REQUIRED_KEYS = ("channel_names", "labels", "file_ending")
# nnU-Net names channel files <case>_<NNNN><file_ending>, NNNN being the 4-digit channel index.
_NNUNET_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One training example: its image file(s), stacked along channels, and its mask."""

    stem: str
    images: tuple[Path, ...]
    mask: Path | None


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
    # Why each unpaired file is unpaired (e.g. which nnU-Net channel file is missing), for the report.
    notes: dict[Path, str] = field(default_factory=dict)

    def stem_of(self, path: Path) -> str:
        """The case stem a file belongs to (nnU-Net channel files drop their _NNNN suffix)."""
        stem = Path(path).stem
        if self.kind == NNUNET and Path(path).parent.name in ("imagesTr", "imagesTs"):
            match = _NNUNET_CHANNEL.match(stem)
            return match["case"] if match else stem
        return stem


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (extension case-insensitive), hidden files skipped, sorted."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def _by_stem(files: list[Path]) -> dict[str, list[Path]]:
    grouped: dict[str, list[Path]] = {}
    for file in files:
        grouped.setdefault(file.stem, []).append(file)
    return grouped


def _discover_folder(root: Path) -> Layout:
    images = _by_stem(_image_files(root / "images"))
    masks = _by_stem(_image_files(root / "masks"))
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
    unpaired_images = [files[0] for stem, files in images.items() if stem not in masks and stem not in duplicates]
    unpaired_masks = [files[0] for stem, files in masks.items() if stem not in images and stem not in duplicates]
    notes = {path: f"no mask masks/{path.stem}.png for this image" for path in unpaired_images}
    notes.update({path: f"no image images/{path.stem}.* for this mask" for path in unpaired_masks})
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
        raise MedsegError(
            f"{path} has file_ending {ending!r}; medseg reads 2D nnU-Net datasets stored as "
            f"{', '.join(IMAGE_EXTENSIONS)}"
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


def _nnunet_split(
    images_dir: Path, labels_dir: Path, channel_ids: list[int], ending: str, unlabelled_ok: bool
) -> tuple[list[Case], list[Path], list[Path], dict[Path, str]]:
    """Pair one imagesXx/labelsXx folder pair: (cases, unpaired images, unpaired labels, notes).

    `unlabelled_ok`: in imagesTs, images without labels are ordinary inference inputs, not problems.
    """
    def files(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(
            entry
            for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(ending.lower())
        )

    channel_files: dict[str, dict[int, Path]] = {}
    unpaired_images: list[Path] = []
    notes: dict[Path, str] = {}
    for path in files(images_dir):
        match = _NNUNET_CHANNEL.match(path.name[: -len(ending)])
        if match is None or int(match["channel"]) not in channel_ids:
            unpaired_images.append(path)
            notes[path] = (
                f"not named <case>_NNNN{ending} with NNNN one of the channels "
                f"{', '.join(f'{c:04d}' for c in channel_ids)} in dataset.json"
            )
            continue
        channel_files.setdefault(match["case"], {})[int(match["channel"])] = path
    labels = {path.name[: -len(ending)]: path for path in files(labels_dir)}

    cases: list[Case] = []
    for name, found in sorted(channel_files.items()):
        missing = [c for c in channel_ids if c not in found]
        label = labels.get(name)
        if missing:
            reason = f"case {name} lacks channel file(s) {', '.join(f'{name}_{c:04d}{ending}' for c in missing)}"
        elif label is None:
            if unlabelled_ok:
                continue
            reason = f"no label {labels_dir.name}/{name}{ending} for this case"
        else:
            cases.append(Case(name, tuple(found[c] for c in channel_ids), label))
            continue
        for path in found.values():
            unpaired_images.append(path)
            notes[path] = reason
    paired = {case.stem for case in cases}
    unpaired_labels = [path for name, path in sorted(labels.items()) if name not in paired]
    for path in unpaired_labels:
        stem = path.name[: -len(ending)]
        notes[path] = (
            f"case {stem} is incomplete (see its image files)"
            if stem in channel_files
            else f"no image {images_dir.name}/{stem}_NNNN{ending} for this label"
        )
    return cases, sorted(unpaired_images), unpaired_labels, notes


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
    cases, unpaired_images, unpaired_masks, notes = _nnunet_split(
        root / "imagesTr", root / "labelsTr", channel_ids, ending, unlabelled_ok=False
    )
    test_cases, test_unpaired_images, test_unpaired_masks, test_notes = _nnunet_split(
        root / "imagesTs", root / "labelsTs", channel_ids, ending, unlabelled_ok=True
    )
    notes.update(test_notes)
    return Layout(
        root=root,
        kind=NNUNET,
        cases=cases,
        test_cases=test_cases,
        unpaired_images=sorted(unpaired_images + test_unpaired_images),
        unpaired_masks=sorted(unpaired_masks + test_unpaired_masks),
        duplicate_stems={},
        labels=dict(meta["labels"]),
        notes=notes,
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
    raise MedsegError(
        f"{root} is not a dataset: expected DATA/images + DATA/masks, or nnU-Net's dataset.json + imagesTr + labelsTr"
    )


def load_case(case: Case, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """A case's image as float32 (H, W, C): its channel files read and concatenated along channels."""
    parts = [read_image(path, reduce_to) for path in case.images]
    sizes = {part.shape[:2] for part in parts}
    if len(sizes) > 1:
        listing = ", ".join(f"{path.name} {part.shape[0]}x{part.shape[1]}" for path, part in zip(case.images, parts))
        raise MedsegError(
            f"channel files of case {case.stem} differ in size ({listing}); resample them to one size"
        )
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
