"""A decoded-data cache: each training image and mask decoded and resized to the training size once.

Without it every epoch decodes every full-size file (a Kvasir-SEG JPEG is up to 1920x1072) to use a 128x128
copy. With it an epoch reads two small .npy files per case (memory-mapped) and pays only for augmentation
and compute. What is cached is exactly what `SegmentationDataset` computes before augmentation: the image
in the network's channels resized (bilinear, antialiased) to the training size with intensities in [0, 1],
and the mask's labels resized with nearest neighbour.

Choices (ours): images are stored as uint16 (value x 65535): a resized 8-bit image is no longer 8-bit, and
uint16 keeps it within 1/65535 (and serves 16-bit sources), at 2 bytes a pixel — 98 KB for a 128x128 RGB
image; labels as uint8 (medseg allows fewer than 256 classes in a mask). An entry is keyed by everything
that shapes it: the image and mask paths, their sizes and modification times, the training size, the
channel count, the class count, the mask threshold and this format's version; a changed file gets a new
entry and an old entry is never read for it. Entries are written to a temporary name and renamed, so
loader workers filling the cache at the same time never read half a file. The folder is
`$MEDSEG_CACHE` or `$XDG_CACHE_HOME/medseg/decoded` (default `~/.cache/medseg/decoded`); deleting it is
always safe. Amplified views (STS-Net) are cut from the full-size image and are not cached.

A network trained on crops (`data.crop`) cuts them from the images at their own size, so its cache holds the
decoded images at native size instead (size `None`, a key of its own): what the cache saves then is the
decoding, at 2 bytes a pixel and channel (2 MB for a 565x584 DRIVE image).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from medseg.data.formats import Case
from medseg.files import atomic_file

FORMAT_VERSION = 1
SCALE = 65535.0


def default_cache_folder() -> Path:
    if os.environ.get("MEDSEG_CACHE"):
        return Path(os.environ["MEDSEG_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medseg" / "decoded"


def _stat(path: Path) -> list:
    info = path.stat()
    return [str(path.resolve()), info.st_size, info.st_mtime_ns]


class DecodedCache:
    """Cached (image, labels) pairs of cases at one training size, channel count and mask reading."""

    def __init__(self, folder: Path, size: tuple[int, int] | None, in_channels: int, num_classes: int,
                 mask_threshold: int | None):
        self.folder = Path(folder)
        self.settings = {"size": "native" if size is None else list(size), "in_channels": in_channels,
                         "num_classes": num_classes,
                         "mask_threshold": mask_threshold, "version": FORMAT_VERSION}

    def key(self, case: Case) -> str:
        files = [_stat(path) for path in case.images] + ([_stat(case.mask)] if case.mask is not None else [])
        text = json.dumps({"files": files, **self.settings}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()

    def paths(self, case: Case) -> tuple[Path, Path]:
        key = self.key(case)
        shard = self.folder / key[:2]
        return shard / f"{key}.image.npy", shard / f"{key}.mask.npy"

    def load(self, case: Case) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(image float (C, H, W) in [0, 1], labels long (H, W)), or None when the case is not cached yet."""
        image_path, mask_path = self.paths(case)
        try:
            image = np.load(image_path, mmap_mode="r")
            labels = np.load(mask_path, mmap_mode="r")
        except (OSError, ValueError):  # absent, or a file from an interrupted writer of another format
            return None
        return (torch.from_numpy(image.astype(np.float32) / SCALE),
                torch.from_numpy(labels.astype(np.int64)))

    def store(self, case: Case, image: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one entry (the mask last: an entry counts as present when both files exist); returns it as
        `load` will, so a cold and a warm cache give the same numbers."""
        image_path, mask_path = self.paths(case)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image.clamp(0, 1).numpy() * SCALE).astype(np.uint16)
        label_values = labels.numpy().astype(np.uint8)
        _save_atomic(image_path, pixels)
        _save_atomic(mask_path, label_values)
        return torch.from_numpy(pixels.astype(np.float32) / SCALE), torch.from_numpy(label_values.astype(np.int64))

    def get(self, case: Case, decode) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached entry of `case`, made with `decode(case) -> (image, labels)` at the training size (native
        size for a crop cache) when missing."""
        cached = self.load(case)
        return cached if cached is not None else self.store(case, *decode(case))


def _save_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as temporary, temporary.open("wb") as stream:
        np.save(stream, array)
