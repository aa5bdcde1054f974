"""Torch datasets over `Case`s: training pairs at a fixed size, and evaluation items that keep the
original mask so scores are computed at the annotation's own resolution.

With `data.crop` (preprocessing.crop) training pairs are crops of the images at their own resolution instead:
a random crop per item for training (drawn from the item's keyed seed, so resumes reproduce it), the centre
crop for validation (ours: cheap, deterministic and one batch shape; the full images are scored tiled by
`medseg evaluate`). An image smaller than the crop is first padded bottom/right by reflection (replication
where it is too small to reflect), its mask alike (`pad_to_at_least`).
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from torchvision.transforms import v2

from medseg.data.amplify import AmplifiedCase
from medseg.data.amplify import apply as amplify_view
from medseg.data.cache import DecodedCache
from medseg.data.formats import Case, load_case
from medseg.data.io import mask_to_labels, read_mask, to_channels
from medseg.data.transforms import Preprocessing, augment_pair, build_augmentation, pad_to_at_least, resize_mask
from medseg.errors import MedsegError


def load_image_tensor(case: Case, preprocessing: Preprocessing, reduce: bool = True) -> torch.Tensor:
    """A case's image as float (C, H, W) in [0, 1] with the network's channel count, at its own size."""
    image = load_case(case, reduce_to=preprocessing.size if reduce else None)
    image = to_channels(image, preprocessing.in_channels)
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def load_labels(case: Case, num_classes: int, mask_threshold: int | None) -> torch.Tensor:
    raw = read_mask(case.mask)
    return torch.from_numpy(mask_to_labels(raw, num_classes, mask_threshold, path=case.mask).astype(np.int64))


def decode_resized(case: Case, preprocessing: Preprocessing, num_classes: int,
                   mask_threshold: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A case's image at the training size in [0, 1] and its labels resized with nearest neighbour: what the
    decoded-data cache holds."""
    image = preprocessing.resize(load_image_tensor(case, preprocessing))
    labels = resize_mask(load_labels(case, num_classes, mask_threshold), preprocessing.size)
    return image, labels


def decode_native(case: Case, preprocessing: Preprocessing, num_classes: int,
                  mask_threshold: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A case's image at its own size in [0, 1] and its labels: what crops are cut from (and a crop run's cache
    holds)."""
    return (load_image_tensor(case, preprocessing, reduce=False),
            load_labels(case, num_classes, mask_threshold))


def decoder(preprocessing: Preprocessing):
    """The decoding training uses: native size for a network trained on crops, else resized to the training
    size."""
    return decode_native if preprocessing.crop is not None else decode_resized


def intensity_statistics(cases: list[Case], preprocessing: Preprocessing,
                         cache: DecodedCache | None = None, num_classes: int = 1,
                         mask_threshold: int | None = None) -> tuple[float, float]:
    """One mean and one standard deviation over every pixel and channel of `cases`, as the network sees them
    (the network's channels, resized to the training size, or at their own size for a crop-trained network,
    intensities in [0, 1]): FocusNet's z-scoring with "the mean pixel value" of the dataset (paper Sec. 3.2).
    Accumulated in float64."""
    if not cases:
        raise MedsegError("no training images to compute data.normalize: dataset statistics from")
    total = squares = count = 0.0
    decode = decoder(preprocessing)
    for case in cases:
        if cache is None:
            image = decode(case, preprocessing, num_classes, mask_threshold)[0].double()
        else:
            image = cache.get(case, lambda c: decode(c, preprocessing, num_classes, mask_threshold))[0].double()
        total += float(image.sum())
        squares += float((image * image).sum())
        count += image.numel()
    mean = total / count
    return mean, math.sqrt(max(squares / count - mean * mean, 0.0))


def keyed_seed(*keys: int) -> int:
    """A random seed that is a function of the integer `keys` alone (seed, epoch[, index])."""
    entropy = [key % 2**64 for key in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


class EpochShuffle(Sampler):
    """A training order that is a function of (seed, epoch) alone, yielding (epoch, index) keys so that
    `SegmentationDataset` draws each item's augmentation from (seed, epoch, index) too.

    Why: with the loader's usual RandomSampler and worker-seeded augmentation, what epoch e sees depends on
    every random draw before it (and on the loader workers' states), so a run resumed from a checkpoint
    trains on other batches than the uninterrupted run. Keyed draws make kill -9 + `--resume` reproduce the
    uninterrupted run exactly, whatever the number of loader workers. Lightning calls `set_epoch` before each
    epoch; where nobody does (DDP wraps the sampler), each pass advances the epoch itself.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0):
        self.size, self.seed, self.epoch = size, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(keyed_seed(self.seed, epoch)))
        return iter([(epoch, index) for index in order.tolist()])


class SegmentationDataset(Dataset):
    """(image, mask) pairs resized to the training size, augmented when `augment` is given; amplified
    views (STS-Net) are derived from their source case on the fly. With `preprocessing.crop`, crops at native
    resolution instead: random ones with `random_crop`, else the centre crop (module docstring).

    Items: {"image": float (C, H, W) normalised, "mask": long (H, W), "stem": str}. With `cache`, cases are
    decoded and resized once (`medseg.data.cache`). Indexed by an (epoch, index) key (`EpochShuffle`), an
    item also has "seed" and its augmentation is drawn from that seed, leaving the process's RNG as it was.
    """

    def __init__(self, cases: list[Case | AmplifiedCase], preprocessing: Preprocessing, num_classes: int,
                 mask_threshold: int | None = None, augment: list[Any] | None = None,
                 cache: DecodedCache | None = None, seed: int = 0, random_crop: bool = False):
        self.cases = cases
        self.cache = cache
        self.seed = seed
        self.preprocessing = preprocessing
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        crop = preprocessing.crop
        self.augmentation = build_augmentation(augment or [], crop or preprocessing.size)
        self.cropper = None if crop is None else v2.RandomCrop(crop) if random_crop else v2.CenterCrop(crop)

    def __len__(self) -> int:
        return len(self.cases)

    def _decode(self, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        return decoder(self.preprocessing)(case, self.preprocessing, self.num_classes, self.mask_threshold)

    def fill_cache(self) -> None:
        """Decode every case into the cache (no-op without one): what a first epoch does once."""
        if self.cache is not None:
            for case in self.cases:
                if not isinstance(case, AmplifiedCase):
                    self.cache.get(case, self._decode)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            seed = keyed_seed(self.seed, *key)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return {**self._item(key[1]), "seed": seed}
        return self._item(key)

    def _item(self, index: int) -> dict[str, Any]:
        item = self.cases[index]
        if isinstance(item, AmplifiedCase):
            # An amplified view's pixel boxes refer to the full-size image, so it is decoded in full.
            image = load_image_tensor(item.case, self.preprocessing, reduce=False)
            labels = load_labels(item.case, self.num_classes, self.mask_threshold)
            image, labels = amplify_view(item, image, labels)
            image, mask = self.preprocessing.resize(image), resize_mask(labels, self.preprocessing.size)
        elif self.cache is not None:
            image, mask = self.cache.get(item, self._decode)
        else:
            image, mask = self._decode(item)
        if self.cropper is not None:
            crop = self.preprocessing.crop
            image, mask = pad_to_at_least(image, crop), pad_to_at_least(mask, crop)
            image, mask = augment_pair(self.cropper, image, mask)
        image, mask = augment_pair(self.augmentation, image, mask)
        return {"image": self.preprocessing.normalise(image), "mask": mask.long(), "stem": item.stem}


class InferenceDataset(Dataset):
    """Images at the network's size for batched inference; with masks, the original-size labels too.

    Items: {"image": normalised (C, H, W) at preprocessing.size, "stem", "size": (H0, W0),
    and "mask": long (H0, W0) when `with_masks`}. `normalise=False` leaves intensities in [0, 1] (an ensemble's
    members normalise themselves); `resize=False` keeps each image at its own size (tiled or native inference).
    """

    def __init__(self, cases: list[Case], preprocessing: Preprocessing, num_classes: int = 1,
                 mask_threshold: int | None = None, with_masks: bool = True, normalise: bool = True,
                 resize: bool = True):
        self.cases = cases
        self.preprocessing = preprocessing
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.with_masks = with_masks
        self.normalise = normalise
        self.resize = resize

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = self.cases[index]
        original = load_image_tensor(case, self.preprocessing, reduce=False)
        image = self.preprocessing.resize(original) if self.resize else original
        item = {
            "image": self.preprocessing.normalise(image) if self.normalise else image,
            "stem": case.stem,
            "size": tuple(original.shape[-2:]),
        }
        if self.with_masks:
            item["mask"] = load_labels(case, self.num_classes, self.mask_threshold)
        return item


def collate_inference(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the fixed-size images; keep original-size masks and sizes as lists."""
    batch = {"image": torch.stack([i["image"] for i in items]), "stem": [i["stem"] for i in items],
             "size": [i["size"] for i in items]}
    if "mask" in items[0]:
        batch["mask"] = [i["mask"] for i in items]
    return batch


class MultiScaleCollate:
    """Collate a training batch, then resize it to a size drawn per batch (M2SNet's multi-scale training).

    Images are resized bilinearly, masks with nearest neighbour. The size is drawn from the first item's
    seed (`EpochShuffle` keys), so a batch's size depends on (seed, epoch, batch) alone; items without one
    (no keyed sampler) draw from Python's `random`.
    """

    def __init__(self, sizes: list[int]):
        self.sizes = list(sizes)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        chooser = random.Random(items[0]["seed"]) if "seed" in items[0] else random
        size = chooser.choice(self.sizes)
        images = torch.stack([i["image"] for i in items])
        masks = torch.stack([i["mask"] for i in items])
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
            masks = resize_mask(masks, (size, size))
        return {"image": images, "mask": masks, "stem": [i["stem"] for i in items]}
