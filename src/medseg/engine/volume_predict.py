"""Predicting 3D volumes with a 2D network: slice, predict each slice, stack the labels back on the input's grid.

A network trained on slices from `medseg slices` (STS-Net's 2.5D stacks, Scientific Reports 2025, Methods and
Fig. 2; ANU-Net's single CT / MRI slices, Computers & Graphics 2020, Sec. 4.1) sees a new volume exactly as it saw
its training slices: the model folder records the slicing (mode stack / sum / single, the edge rule, the intensity
window or per-volume min-max, the slice axis; `data/volumes.slicing_record`), and each slice k becomes the same
8-bit image `make_slices` would have written (`volumes.slice_image`). The slice's labels are written back
transposed, as `make_slices` transposed them, so the label volume has the input's voxel order, and the writer
(`volume_io.write_label_volume`) gives it the input's spacing, origin and direction.

Slices go through the run's inference plan (resized, tiled or native; flips; an ensemble) in batches of
`batch_size`; only the 8-bit volume, the label volume and one batch of probabilities are held, so memory is
bounded by the volume, not by the number of slices times the classes.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.io import IMAGE_EXTENSIONS, scale_to_unit, to_channels
from medseg.data.volume_io import (
    NIFTI,
    Volume,
    is_dicom_folder,
    probe_volume,
    read_volume,
    volume_stem,
    write_label_volume,
)
from medseg.data.volumes import EDGES, MODES, SLICE_AXIS, slice_image, to_uint8
from medseg.engine.inference import InferencePlan, build_plan
from medseg.engine.postprocess import PostProcessing, choose_threshold
from medseg.engine.predict import MANIFEST, check_threshold
from medseg.engine.run import now
from medseg.errors import MedsegError
from medseg.files import check_output_folder, stale_removed_once, user_write_errors, write_text_atomic
from medseg.metrics import predict_labels
from medseg.progress import Progress


@dataclass(frozen=True)
class Slicing:
    """How `medseg slices` cut the training volumes: `mode` (stack, sum, single), `edge` (triple, repeat; None for
    single), `window` (lo, hi) or None for per-volume min-max, `axis` (the voxel axis slices are cut across)."""

    mode: str
    edge: str | None
    window: tuple[float, float] | None
    axis: int = SLICE_AXIS

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "edge": self.edge, "axis": self.axis,
                "window": list(self.window) if self.window else None}

    def describe(self) -> str:
        window = f"window {self.window[0]:g}..{self.window[1]:g}" if self.window else "per-volume min-max"
        return f"{self.mode} slices" + (f", {self.edge} edges" if self.edge else "") + f", {window}"


def slicing_of(config: dict[str, Any]) -> Slicing:
    """The slicing a model folder's config records; a network not trained on `medseg slices` output is refused."""
    record = config.get("slicing")
    if not isinstance(record, dict):
        raise MedsegError(f"model {config.get('name', '?')} was not trained on slices from `medseg slices`, so medseg "
                          "does not know how to cut a volume for it (window, 2.5D stack or single slice); train on a "
                          "folder written by `medseg slices`, or predict the 2D slices themselves")
    mode, edge, window = record.get("mode"), record.get("edge"), record.get("window")
    if mode not in MODES or (edge is not None and edge not in EDGES) or record.get("axis", SLICE_AXIS) != SLICE_AXIS:
        raise MedsegError(f"the model's recorded slicing {record} is not one medseg writes (mode {', '.join(MODES)}, "
                          f"edge {', '.join(EDGES)}, axis {SLICE_AXIS}); copy the model folder again from its run")
    return Slicing(mode, edge, (float(window[0]), float(window[1])) if window else None)


@dataclass
class VolumePrediction:
    """Labels (X, Y, Z) on the input's grid; with `probabilities`, the foreground probability of each class
    1..K-1 (one for binary) as 8-bit maps (K', X, Y, Z), 255 = 1."""

    labels: np.ndarray
    probabilities: np.ndarray | None = None


def slice_batches(volume: Volume, slicing: Slicing, in_channels: int,
                  batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(slice indices, images (B, C, H, W) in [0, 1]) of the volume, cut as `make_slices` cuts: the same 8-bit
    image per slice, then the network's channel count as the 2D loader gives it."""
    if volume.array.ndim != 3:
        raise MedsegError(f"a volume has 3 dimensions, this one {volume.array.shape}")
    eight_bit = to_uint8(volume.array, slicing.window)
    depth = eight_bit.shape[SLICE_AXIS]
    for start in range(0, depth, batch_size):
        indices = list(range(start, min(start + batch_size, depth)))
        images = []
        for k in indices:
            picture = slice_image(eight_bit, k, slicing.mode, slicing.edge or "triple")
            pixels = scale_to_unit(picture if picture.ndim == 3 else picture[..., None])
            images.append(torch.from_numpy(np.ascontiguousarray(to_channels(pixels, in_channels).transpose(2, 0, 1))))
        yield indices, torch.stack(images)


def predict_volume(plan: InferencePlan, volume: Volume, slicing: Slicing, threshold: float = 0.5,
                   postprocessing: PostProcessing | None = None, batch_size: int = 8, probabilities: bool = False,
                   progress=None) -> VolumePrediction:
    """Predict every slice of `volume` with `plan` and stack the labels (post-processed per slice, as 2D predict
    does) into a volume of the input's shape; `progress` (a medseg.progress.Progress) counts slices."""
    if batch_size < 1:
        raise MedsegError(f"--batch-size must be at least 1, got {batch_size}")
    postprocessing = postprocessing or PostProcessing()
    labels = np.zeros(volume.array.shape, np.uint8 if plan.num_classes <= 256 else np.uint16)
    maps = None
    if probabilities:
        maps = np.zeros((max(1, plan.num_classes - 1), *volume.array.shape), np.uint8)
    for indices, images in slice_batches(volume, slicing, plan.preprocessing.in_channels, batch_size):
        size = tuple(images.shape[-2:])
        batch = plan.preprocessing.resize(images) if plan.resizes else images
        for k, probs in zip(indices, plan.batch_at_original_size(batch, [size] * len(indices))):
            slice_labels = postprocessing.apply(predict_labels(probs[None], threshold)[0])
            labels[:, :, k] = slice_labels.numpy().T  # make_slices wrote array[:, :, k].T
            if maps is not None:
                scaled = (probs.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                foreground = scaled[-1:] if probs.shape[0] <= 2 else scaled[1:]
                maps[:, :, :, k] = foreground.transpose(0, 2, 1)
        if progress is not None:
            progress.update(len(indices))
    return VolumePrediction(labels, maps)


def volume_inputs(inputs: list[str]) -> list[Path] | None:
    """The volumes `inputs` name when they name only volumes (volume files, folders of them, DICOM series folders,
    folders of series folders, glob patterns); None otherwise: 2D images, or a mix, which predict's 2D path checks
    (it names each volume among the bad inputs, with how to predict it)."""
    volumes: list[Path] = []
    for item in inputs:
        paths = [Path(p) for p in sorted(glob.glob(item))] if any(ch in item for ch in "*?[") else [Path(item)]
        for path in paths or [Path(item)]:
            found = _volumes_in(path)
            if not found:
                return None
            volumes += found
    stems: dict[str, Path] = {}
    for path in volumes:
        stem = _stem(path)
        if stem in stems and stems[stem] != path:
            raise MedsegError(f"two input volumes share the name {stem!r} ({stems[stem]} and {path}); their outputs "
                              "would overwrite each other — predict them into different --out folders")
        stems[stem] = path
    return list(dict.fromkeys(volumes)) or None


def _volumes_in(path: Path) -> list[Path]:
    """The volumes `path` is or holds: itself (a volume file or a DICOM series folder), the volume files of a
    folder without 2D images, or its DICOM series subfolders."""
    if path.is_file():
        return [path] if volume_stem(path) else []
    if not path.is_dir():
        return []
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries):
        return []
    files = [p for p in entries if p.is_file() and volume_stem(p)]
    if files:
        return files
    if is_dicom_folder(path):
        return [path]
    return [p for p in entries if is_dicom_folder(p)]


def _stem(path: Path) -> str:
    return volume_stem(path) or path.name


def _kind(path: Path) -> str:
    if path.is_dir():
        return "a DICOM series"
    return "a NIfTI volume" if path.name.lower().endswith(NIFTI) else "a NRRD/MetaImage volume"


def predict_volumes(model_path: str | Path, volumes: list[Path], out: str | Path, probabilities: bool = False,
                    threshold: float | None = None, batch_size: int = 8, device: str = "auto",
                    level: int | None = None, precision: str = "auto", *, ensemble: list[str | Path] = (),
                    tile: str | None = None, overlap: float | None = None, tta: str = "none", native: bool = False,
                    postprocessing: PostProcessing | None = None, dicom_seg: bool = False,
                    series: str | None = None) -> dict[str, Any]:
    """Predict each volume slice by slice and write OUT/<stem>.nii.gz on its grid (with `probabilities`,
    <stem>_prob.nii.gz, or _prob_c<k> per class; with `dicom_seg`, <stem>.seg.dcm for a DICOM series), plus
    OUT/predict.json; returns that manifest. Every volume's header (or series) is checked before anything is written;
    volumes are then read and predicted one at a time."""
    if threshold is not None:
        check_threshold(threshold)
    postprocessing = postprocessing or PostProcessing()
    out = check_output_folder(out, "--out")
    plan = build_plan([model_path, *ensemble], device, level, precision, tile, overlap, tta, native, batch_size)
    predictor = plan.reference
    try:
        slicing = slicing_of(predictor.config)
    except MedsegError as exc:  # the usual reason: a volume given to a 2D model; name it
        raise MedsegError(f"{volumes[0]} is {_kind(volumes[0])}, but {exc}") from None
    tuned = predictor.threshold if len(plan.predictors) == 1 else None
    threshold, threshold_source = choose_threshold(threshold, tuned, predictor.num_classes)
    not_dicom = [p for p in volumes if not p.is_dir()]
    if dicom_seg and not_dicom:
        raise MedsegError(f"--dicom-seg writes a DICOM SEG that references its source series, but {not_dicom[0]} is "
                          "not a DICOM series folder; drop --dicom-seg for NIfTI, NRRD and MetaImage inputs")
    shapes = {path: probe_volume(path, series) for path in volumes}  # every header checked before any output
    manifest = {
        "complete": False, "started": now(), "finished": None, "model": str(predictor.folder.resolve()),
        "settings": {"threshold": threshold, "threshold_source": threshold_source,
                     "postprocess": postprocessing.to_dict(), "probabilities": probabilities, "level": level,
                     "precision": precision, "device": str(predictor.device), "batch_size": batch_size,
                     "inference": plan.to_dict(), "slicing": slicing.to_dict(), "dicom_seg": dicom_seg,
                     "series": series},
        "inputs": [str(p) for p in volumes], "outputs": [], "skipped": [], "volumes": [],
    }
    with user_write_errors(), stale_removed_once(out):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        slices = sum(shape[SLICE_AXIS] for shape in shapes.values())
        with Progress("predict", slices, unit="slices") as progress:
            for path in volumes:  # one volume in memory at a time
                volume, stem = read_volume(path, series), _stem(path)
                result = predict_volume(plan, volume, slicing, threshold, postprocessing, batch_size, probabilities,
                                        progress)
                source = None if path.is_dir() else path
                written = [write_label_volume(result.labels, volume, out / f"{stem}.nii.gz", source).name]
                if result.probabilities is not None:
                    suffixes = ["_prob"] if len(result.probabilities) == 1 else \
                        [f"_prob_c{k}" for k in range(1, len(result.probabilities) + 1)]
                    for suffix, channel in zip(suffixes, result.probabilities):
                        written.append(write_label_volume(channel, volume, out / f"{stem}{suffix}.nii.gz",
                                                          source).name)
                if dicom_seg:
                    from medseg.data.dicom_seg import write_dicom_seg

                    written.append(write_dicom_seg(result.labels, path, out / f"{stem}.seg.dcm", series).name)
                manifest["outputs"] += written
                manifest["volumes"].append({
                    "input": str(path), "outputs": written, "shape": list(volume.array.shape),
                    "spacing": list(volume.spacing), "origin": list(volume.origin),
                    "direction": list(volume.direction),
                    "foreground_voxels": int(np.count_nonzero(result.labels))})
                write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        manifest.update(complete=True, finished=now())
        write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest
