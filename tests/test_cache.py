"""The decoded-data cache: the same numbers as decoding, read from disk the second time, renewed when a file
changes, off with data.cache: false."""

import json
import os

import numpy as np
import pytest
import torch

from medseg.data.cache import SCALE, DecodedCache
from medseg.data.dataset import SegmentationDataset, decode_resized
from medseg.data.formats import discover
from medseg.data.transforms import Preprocessing


@pytest.fixture()
def cases(kvasir_subset):
    return discover(kvasir_subset).cases[:4]


def preprocessing() -> Preprocessing:
    return Preprocessing(size=(64, 64), in_channels=3, normalize="imagenet")


def test_a_cached_case_equals_its_decoding_and_is_read_from_disk_the_second_time(cases, tmp_path):
    cache = DecodedCache(tmp_path, (64, 64), 3, 1, None)
    case = cases[0]
    fresh_image, fresh_labels = decode_resized(case, preprocessing(), 1, None)
    image, labels = cache.get(case, lambda c: decode_resized(c, preprocessing(), 1, None))
    assert (image - fresh_image).abs().max() <= 0.5 / SCALE + 1e-7 and torch.equal(labels, fresh_labels.long())
    image_file, mask_file = cache.paths(case)
    assert np.load(image_file).dtype == np.uint16 and np.load(mask_file).shape == (64, 64)

    def refuse(_):
        raise AssertionError("decoded again although cached")

    again_image, again_labels = cache.get(case, refuse)
    assert torch.equal(again_image, image) and torch.equal(again_labels, labels)


def test_a_changed_file_gets_a_new_entry(cases, tmp_path):
    cache = DecodedCache(tmp_path, (64, 64), 3, 1, None)
    case = cases[1]
    before = cache.key(case)
    stat = case.mask.stat()
    os.utime(case.mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.key(case) != before
    assert DecodedCache(tmp_path, (96, 96), 3, 1, None).key(case) != cache.key(case)
    assert DecodedCache(tmp_path, (64, 64), 1, 1, None).key(case) != cache.key(case)


def test_cold_and_warm_cache_give_the_same_training_items(cases, tmp_path):
    cache = DecodedCache(tmp_path, (64, 64), 3, 1, None)
    dataset = SegmentationDataset(cases, preprocessing(), 1, cache=cache)
    cold = [dataset[i] for i in range(len(cases))]
    warm = [dataset[i] for i in range(len(cases))]
    assert len(list(tmp_path.rglob("*.npy"))) == 2 * len(cases)
    for first, second in zip(cold, warm):
        assert torch.equal(first["image"], second["image"]) and torch.equal(first["mask"], second["mask"])
    uncached = SegmentationDataset(cases, preprocessing(), 1)[0]
    assert (uncached["image"] - cold[0]["image"]).abs().max() < 1e-4 and torch.equal(uncached["mask"], cold[0]["mask"])


def test_training_fills_the_cache_unless_switched_off(phantom, tmp_path, decoded_cache_folder):
    from conftest import TINY
    from medseg.config import load_recipe
    from medseg.engine.train import train

    before = set(decoded_cache_folder.rglob("*.npy"))
    run = train(load_recipe("unet", [*TINY, "train.epochs=1", "data.size=32"]), phantom, out=tmp_path, name="cached",
                progress=False)
    filled = set(decoded_cache_folder.rglob("*.npy")) - before
    splits = json.loads(run.splits_file.read_text())
    # an image and a mask per case read: every validation case, the training cases but a dropped last batch (< 4)
    cases = len(filled) // 2
    assert len(filled) % 2 == 0 and len(splits["val"]) + len(splits["train"]) - 3 <= cases
    assert cases <= len(splits["val"]) + len(splits["train"])
    train(load_recipe("unet", [*TINY, "train.epochs=1", "data.size=48", "data.cache=false"]), phantom, out=tmp_path,
          name="uncached", progress=False)
    assert set(decoded_cache_folder.rglob("*.npy")) - before == filled
