import json

import pytest
import torch

from medseg.data.dataset import MultiScaleCollate, SegmentationDataset
from medseg.data.formats import discover
from medseg.data.splits import cases_for, make_splits, seeded_split
from medseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, augment_pair, build_augmentation
from medseg.errors import MedsegError


def _pair(size: int = 32):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[5:14, 3:25] = 1
    mask[20:30, 18:22] = 1
    # channel 0 carries the mask, channels 1-2 a position code, so misalignment shows
    image = torch.stack([mask.float(), torch.rand(size, size, generator=g), torch.linspace(0, 1, size).repeat(size, 1)])
    return image, mask


@pytest.mark.parametrize("spec", [["hflip"], ["vflip"], ["rot90"],
                                  [{"name": "hflip", "p": 1.0}, {"name": "vflip", "p": 1.0}]])
def test_exact_geometric_augmentations_keep_image_and_mask_aligned(spec):
    torch.manual_seed(0)
    augmentation = build_augmentation(spec, (32, 32))
    image, mask = _pair()
    moved = 0
    for _ in range(12):
        out_image, out_mask = augment_pair(augmentation, image, mask)
        assert torch.equal(out_image[0].round().long(), out_mask)
        moved += not torch.equal(out_mask, mask)
    assert moved > 0  # the augmentation really does something


@pytest.mark.parametrize("spec", [[{"name": "rotate", "degrees": 30}],
                                  [{"name": "affine", "degrees": 10, "translate": [0.1, 0.1], "scale": [0.8, 1.2]}],
                                  [{"name": "zoom", "scale": [0.7, 1.3]}]])
def test_interpolating_augmentations_keep_masks_as_labels_and_aligned(spec):
    torch.manual_seed(1)
    augmentation = build_augmentation(spec, (32, 32))
    image, mask = _pair()
    for _ in range(8):
        out_image, out_mask = augment_pair(augmentation, image, mask)
        assert set(out_mask.unique().tolist()) <= {0, 1}  # nearest: no interpolated labels
        agreement = ((out_image[0] > 0.5).long() == out_mask).float().mean()
        assert agreement > 0.95  # bilinear image vs nearest mask differ only on edges


def test_colour_jitter_leaves_masks_untouched():
    image, mask = _pair()
    out_image, out_mask = augment_pair(build_augmentation([{"name": "color_jitter", "brightness": 0.5}], (32, 32)),
                                       image, mask)
    assert torch.equal(out_mask, mask)


def test_grayscale_gives_every_channel_the_luma_and_leaves_masks_untouched():
    image, mask = _pair()
    image = torch.stack([image[0], image[0] * 0.5, image[0] * 0.25])  # an RGB image
    out_image, out_mask = augment_pair(build_augmentation([{"name": "grayscale", "p": 1.0}], (32, 32)), image, mask)
    luma = 0.2989 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    assert torch.equal(out_mask, mask) and out_image.shape == image.shape
    assert all(torch.allclose(channel, luma, atol=1e-6) for channel in out_image)


def test_unknown_augmentation_and_bad_options_are_clear_errors():
    with pytest.raises(MedsegError, match="unknown augmentation 'elastic'"):
        build_augmentation(["elastic"], (32, 32))
    with pytest.raises(MedsegError, match="needs a square"):
        build_augmentation(["rot90"], (32, 48))
    with pytest.raises(MedsegError, match="rotate"):
        build_augmentation([{"name": "rotate", "angle": 3}], (32, 32))


def test_normalisation_modes():
    image = torch.rand(3, 8, 8)
    imagenet = Preprocessing((8, 8), 3, "imagenet").normalise(image)
    assert torch.allclose(imagenet[1], (image[1] - IMAGENET_MEAN[1]) / IMAGENET_STD[1])
    per_image = Preprocessing((8, 8), 3, "per_image").normalise(image)
    assert per_image.mean().abs() < 1e-5 and (per_image.std() - 1).abs() < 1e-3
    custom = Preprocessing((8, 8), 1, {"mean": [0.5], "std": [0.25]}).normalise(torch.full((1, 2, 2), 0.75))
    assert torch.allclose(custom, torch.ones(1, 2, 2))
    prep = Preprocessing((8, 16), 1, "none")
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_multiscale_collate_resizes_whole_batches():
    collate = MultiScaleCollate([16, 24])
    image, mask = _pair()
    batch = collate([{"image": image, "mask": mask, "stem": "a"}, {"image": image, "mask": mask, "stem": "b"}])
    size = batch["image"].shape[-1]
    assert size in (16, 24) and batch["mask"].shape == (2, size, size)
    assert set(batch["mask"].unique().tolist()) <= {0, 1}


def test_seeded_split_is_stable_disjoint_and_complete():
    stems = [f"c{i:02d}" for i in range(20)]
    first, second = seeded_split(stems, 0.1, 0.2, seed=0), seeded_split(list(reversed(stems)), 0.1, 0.2, seed=0)
    assert first == second
    assert (len(first["train"]), len(first["val"]), len(first["test"])) == (14, 2, 4)
    assert sorted(first["train"] + first["val"] + first["test"]) == stems
    assert seeded_split(stems, 0.1, 0.2, seed=1) != first
    with pytest.raises(MedsegError, match="too few"):
        seeded_split(["a", "b"], 0.5, 0.5, 0)


def test_splits_json_in_the_data_folder_wins(phantom, tmp_path):
    layout = discover(phantom)
    stems = sorted(c.stem for c in layout.cases)
    (phantom / "splits.json").write_text(json.dumps({"train": stems[:10], "val": stems[10:12], "test": stems[12:]}))
    try:
        splits, source = make_splits(layout, 0.1, 0.2, 0)
        assert splits["val"] == stems[10:12] and source.endswith("splits.json")
        (phantom / "splits.json").write_text(json.dumps({"train": ["nope"], "val": []}))
        with pytest.raises(MedsegError, match="no image/mask pair"):
            make_splits(layout, 0.1, 0.2, 0)
    finally:
        (phantom / "splits.json").unlink()


def test_training_dataset_yields_normalised_pairs_at_the_recipe_size(phantom):
    layout = discover(phantom)
    dataset = SegmentationDataset(cases_for(layout, [layout.cases[0].stem]), Preprocessing((48, 40), 1, "per_image"),
                                  num_classes=1, augment=["hflip"])
    item = dataset[0]
    assert item["image"].shape == (1, 48, 40) and item["mask"].shape == (48, 40)
    assert item["mask"].dtype == torch.long and set(item["mask"].unique().tolist()) <= {0, 1}
