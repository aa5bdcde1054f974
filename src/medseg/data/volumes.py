"""Slices from 3D volumes: 2.5D for STS-Net (Scientific Reports 2025, Methods and Fig. 2; the authors' code),
single slices for ANU-Net (Computers & Graphics 2020, Sec. 4.1).

`medseg slices VOLUMES --out DATA` reads image / label volume pairs (NIfTI, NRRD, MetaImage, or a DICOM series
folder for an image; read by data/volume_io.py, voxels (X, Y, Z)) and writes medseg's folder format, one PNG pair
per axial slice k (the volume's last axis; written as array[:, :, k].T, so rows follow the second voxel axis;
image and mask get the same transform):
- `stack` (STS-Net's paper, default): a 3-channel image of slices (k-1, k, k+1) as (R, G, B);
- `sum` (STS-Net's code, 2.5D_L.py): one channel, the pixel sum of the same three slices of the 8-bit
  intensities clipped at 255; medseg repeats it to 3 channels;
- `single` (ANU-Net, Sec. 4.1: networks trained on single CT / MRI slices): one 8-bit gray channel, slice k
  alone, so an `in_channels: 1` recipe sees the slice itself rather than the luma of a stack.
The first and last slice have one neighbour; `edge` says what stands in for the missing one:
- `triple` (default; STS-Net Fig. 2 caption: the first 2.5D image is "the product of tripling the first slice",
  and likewise the last): the edge slice three times, (0, 0, 0) and (n-1, n-1, n-1);
- `repeat` (medseg's rule before issue 15): the edge slice stands in for the missing neighbour only,
  (0, 0, 1) and (n-2, n-1, n-1).
The authors' code (2.5D_L.py) writes neither at the edges in its sum: it saves the edge slice doubled
(pixel + pixel, clipped), without the neighbour; medseg keeps one edge rule for both 2.5D modes (ours).
Intensities become 8-bit either through `window=(lo, hi)` (clip to the window, e.g. HU [-200, 200] for
liver CT (both papers) or [0, 1023] for STS-Net's T2 clip, then scale to 0..255) or, without one, per-volume
min-max. Labels: > 0 becomes 255 (binary), or the integer labels are kept (`keep_labels`). `only_lesion`
keeps the slices whose label has foreground.

Pairs: VOLUMES/images/<stem>.<ext> with VOLUMES/labels/<stem>.<ext> (or masks/; ext one of .nii[.gz], .nrrd,
.nhdr, .mha, .mhd, and the two may differ), or nnU-Net's raw 3D layout imagesTr/<case>_0000.<ext> with
labelsTr/<case>.<ext>. An image may also be a DICOM series folder images/<stem>/ (`series`: the UID to read
where a folder holds several); its label is a volume file labels/<stem>.<ext>. Image and label must have one
shape and lie on one voxel grid (direction, spacing, origin; `same_grid`), else one line says what differs.

Slice k of volume <stem> is named <stem>_<kkkk>; the folder also gets `slices.json` (MANIFEST), which records
the volume of every slice, so that splits and study folds keep each volume whole without guessing it from the
stems (`slice_volumes`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.io import IMAGE_EXTENSIONS, write_image_atomic
from medseg.data.volume_io import Volume, is_dicom_folder, read_volume, same_grid, volume_stem
from medseg.errors import MedsegError
from medseg.files import atomic_folder, write_text_atomic

MODES = ("stack", "sum", "single")
EDGES = ("triple", "repeat")
SLICE_AXIS = 2  # slices are cut across the last voxel axis (axial for an axially acquired volume)
MANIFEST = "slices.json"  # in a folder written by make_slices: {"volumes": {volume: [slice stems]}, ...}


def _volumes(folder: Path, series_folders: bool = False, ignored: list[Path] | None = None) -> dict[str, Path]:
    """{stem: volume file}, and {folder name: DICOM series folder} where `series_folders`; two files of one stem
    (case01.nii.gz and case01.mha) are an error naming them. Entries that are neither go to `ignored`."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        stem = path.name if series_folders and is_dicom_folder(path) else volume_stem(path)
        if stem is None:
            if ignored is not None:
                ignored.append(path)
            continue
        if stem in found:
            raise MedsegError(f"{folder}: {found[stem].name} and {path.name} are both volume {stem}; keep one")
        found[stem] = path
    return found


@dataclass
class VolumePairing:
    """What a volume folder holds: (stem, image, label) pairs, the volumes without a partner, and the entries of
    its image and label folders that are not volumes (nor, among images, DICOM series folders)."""

    pairs: list[tuple[str, Path, Path]]
    unpaired_images: list[Path]
    unpaired_labels: list[Path]
    ignored: list[Path]
    nnunet: bool


def pair_volumes(root: str | Path) -> VolumePairing:
    """Pair the image and label volumes of `root` without refusing unpaired ones (`medseg check-data` lists them);
    a folder without the layout, or two files of one stem, is an error."""
    root = Path(root)
    ignored: list[Path] = []
    nnunet = (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir()
    if nnunet:
        images = {s.removesuffix("_0000"): p for s, p in _volumes(root / "imagesTr", True, ignored).items()
                  if s.endswith("_0000")}
        labels = _volumes(root / "labelsTr", ignored=ignored)
    else:
        label_dir = next((root / d for d in ("labels", "masks") if (root / d).is_dir()), None)
        if not (root / "images").is_dir() or label_dir is None:
            raise MedsegError(f"{root} has no volume pairs: expected images/ + labels/ (NIfTI, NRRD, MHA/MHD or DICOM "
                              "series folders, same stems) or nnU-Net's imagesTr/<case>_0000.nii.gz + "
                              "labelsTr/<case>.nii.gz")
        images, labels = _volumes(root / "images", True, ignored), _volumes(label_dir, ignored=ignored)
    return VolumePairing(
        pairs=[(stem, images[stem], labels[stem]) for stem in sorted(set(images) & set(labels))],
        unpaired_images=[images[stem] for stem in sorted(set(images) - set(labels))],
        unpaired_labels=[labels[stem] for stem in sorted(set(labels) - set(images))],
        ignored=ignored, nnunet=nnunet,
    )


def find_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, image volume, label volume) for every pair; unpaired files are an error naming them."""
    root = Path(root)
    pairing = pair_volumes(root)
    unpaired = sorted(volume_stem(p) or p.name for p in pairing.unpaired_images + pairing.unpaired_labels)
    if unpaired:
        raise MedsegError(f"{root}: volumes without a partner: {', '.join(unpaired[:5])}; "
                          "every image needs a label volume")
    if not pairing.pairs:
        raise MedsegError(f"{root} holds no volumes (.nii[.gz], .nrrd, .nhdr, .mha, .mhd or DICOM series folders)")
    return pairing.pairs


def is_volume_folder(data: str | Path) -> bool:
    """Whether `data` holds volume pairs rather than a 2D data folder: its images/ (or imagesTr/) holds volume files
    or DICOM series folders and no 2D image, so that a stray NIfTI in a 2D folder leaves it a 2D folder (ours).
    Series folders are probed only when no volume file is found: a 2D folder costs a listing."""
    data = Path(data)
    for name in ("images", "imagesTr"):
        folder = data / name
        if not folder.is_dir():
            continue
        entries = [path for path in folder.iterdir() if not path.name.startswith(".")]
        if any(path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() for path in entries):
            return False
        if any(volume_stem(path) is not None for path in entries):
            return True
        return any(path.is_dir() and is_dicom_folder(path) for path in entries)
    return False


def read_pair(image_path: Path, label_path: Path, series: str | None = None) -> tuple[Volume, Volume]:
    """An image volume and its label volume, refused in one line unless they match voxel for voxel on one grid."""
    image, label = read_volume(image_path, series), read_volume(label_path)
    if image.array.shape != label.array.shape:
        raise MedsegError(f"{image_path.name} is {image.array.shape} but {label_path.name} is {label.array.shape}; "
                          "image and label volumes must match voxel for voxel")
    differs = same_grid(image, label)
    if differs:
        raise MedsegError(f"{image_path.name} and {label_path.name} lie on different voxel grids ({differs}); "
                          "resample the label onto the image (e.g. SimpleITK Resample) so voxels pair up")
    return image, label


def to_uint8(volume: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Intensities to 0..255: clip to the window and scale it, or min-max over the volume."""
    low, high = window if window is not None else (float(volume.min()), float(volume.max()))
    if high <= low:
        return np.zeros(volume.shape, np.uint8)
    scaled = (np.clip(volume.astype(np.float64), low, high) - low) / (high - low) * 255
    return np.round(scaled).astype(np.uint8)


def neighbours(k: int, depth: int, edge: str) -> tuple[int, int, int]:
    """The slice indices (k-1, k, k+1) of slice k in a volume of `depth` slices, edges by the `edge` rule."""
    if edge == "triple" and k in (0, depth - 1):
        return k, k, k
    return max(k - 1, 0), k, min(k + 1, depth - 1)


def slice_image(volume: np.ndarray, k: int, mode: str, edge: str = "triple") -> np.ndarray:
    """The image of slice k from an 8-bit volume (X, Y, Z): (H, W, 3) for stack, (H, W) for sum and single."""
    if mode == "single":
        return volume[:, :, k].T
    slices = [volume[:, :, i] for i in neighbours(k, volume.shape[2], edge)]
    if mode == "stack":
        return np.stack([s.T for s in slices], axis=-1)
    total = sum(s.astype(np.int32) for s in slices)
    return np.clip(total, 0, 255).astype(np.uint8).T


def make_slices(volumes: str | Path, out: str | Path, window: tuple[float, float] | None = None, mode: str = "stack",
                only_lesion: bool = False, keep_labels: bool = False, edge: str = "triple",
                series: str | None = None) -> dict:
    """Write every slice of every pair to `out` (folder format, atomically); returns what was written."""
    if mode not in MODES:
        raise MedsegError(f"--mode must be {', '.join(MODES)}, got {mode!r}")
    if edge not in EDGES:
        raise MedsegError(f"--edge must be {' or '.join(EDGES)}, got {edge!r}")
    out = Path(out)
    if out.exists():
        raise MedsegError(f"{out} exists; slices writes a new folder, so give another --out or remove it")
    pairs = find_pairs(volumes)
    written, skipped = 0, 0
    of_volume: dict[str, list[str]] = {}
    with atomic_folder(out) as tmp:
        for stem, image_path, label_path in pairs:
            image_volume, label_volume = read_pair(image_path, label_path, series)
            image, labels = to_uint8(image_volume.array, window), label_volume.array
            for k in range(image.shape[2]):
                label = labels[:, :, k].T
                if only_lesion and not np.any(label > 0):
                    skipped += 1
                    continue
                name = f"{stem}_{k:04d}.png"
                write_image_atomic(tmp / "images" / name, slice_image(image, k, mode, edge))
                mask = label.astype(np.uint8) if keep_labels else (label > 0).astype(np.uint8) * 255
                write_image_atomic(tmp / "masks" / name, mask)
                of_volume.setdefault(stem, []).append(name[: -len(".png")])
                written += 1
        if not written:
            raise MedsegError(f"no slice was written from {volumes}"
                              + (" (no slice has foreground)" if only_lesion else ""))
        record = {"volumes": len(pairs), "slices": written, "skipped_without_lesion": skipped, "mode": mode,
                  "edge": None if mode == "single" else edge, "axis": SLICE_AXIS,
                  "window": list(window) if window else "per-volume min-max"}
        write_text_atomic(tmp / MANIFEST, json.dumps({**record, "volumes": of_volume}, indent=1) + "\n")
    return {**record, "out": str(out)}


def slice_volumes(root: str | Path) -> dict[str, str] | None:
    """{slice stem: its volume} from the MANIFEST of a folder written by `make_slices`; None for any other folder."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        volumes = json.loads(path.read_text())["volumes"]
        found = {str(stem): str(volume) for volume, stems in volumes.items() for stem in stems}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise MedsegError(f"cannot read {path}: it must be the {{\"volumes\": {{volume: [slice stems]}}}} record "
                          "`medseg slices` writes; restore it, or delete it and set data.split.groups") from None
    return found


def slicing_record(root: str | Path) -> dict | None:
    """How the slices of a folder written by `make_slices` were made ({mode, edge, window, axis}: what a network
    trained on them needs to slice a new volume the same way), or None for any other folder."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        window = record["window"]
        return {"mode": record["mode"], "edge": record["edge"], "axis": record.get("axis", SLICE_AXIS),
                "window": [float(v) for v in window] if isinstance(window, list) else None}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise MedsegError(f"cannot read {path}: it must be the record `medseg slices` writes; restore it, or write "
                          "the slices again") from None
