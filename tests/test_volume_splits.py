"""Patient-level splits: a `medseg slices` folder's default split and study folds keep every volume whole; a
`data.split.groups` regex does the same on a plain folder; the split is seeded and refuses too few groups."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.config import load_recipe
from medseg.data.folds import split_groups
from medseg.data.formats import discover
from medseg.data.io import write_image_atomic
from medseg.data.splits import grouped_split, make_splits
from medseg.data.volumes import MANIFEST, make_slices
from medseg.engine.data import SegmentationDataModule
from medseg.engine.study import StudyFile, dataset_splits
from medseg.errors import MedsegError

DEPTHS = (3, 9, 5, 7, 4, 8, 6, 5)  # unequal volumes, so a split by stems alone would cut some of them


def _volumes(root: Path, depths=DEPTHS) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i, depth in enumerate(depths):
        image = rng.integers(0, 400, (16, 16, depth)).astype(np.int16)
        labels = np.zeros((16, 16, depth), np.uint8)
        labels[4:9, 5:11, :] = 1
        labels[:, :, 0] = 0  # an empty slice in every volume
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / f"vol{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labels" / f"vol{i:02d}.nii.gz")
    return root


@pytest.fixture(scope="module")
def sliced(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sliced")
    return Path(make_slices(_volumes(tmp / "volumes"), tmp / "slices")["out"])


def _volume_of(stem: str) -> str:
    return stem.rsplit("_", 1)[0]


def _assert_volumes_whole(splits: dict[str, list[str]], stems: set[str]) -> None:
    seen: dict[str, str] = {}
    for name, part in splits.items():
        for stem in part:
            volume = _volume_of(stem)
            assert seen.setdefault(volume, name) == name, f"{volume} is in {seen[volume]} and {name}"
    assert sorted(s for part in splits.values() for s in part) == sorted(stems)


def test_slices_writes_a_manifest_of_each_slice_volume(sliced: Path):
    manifest = json.loads((sliced / MANIFEST).read_text())
    assert {v: len(s) for v, s in manifest["volumes"].items()} == {f"vol{i:02d}": d for i, d in enumerate(DEPTHS)}
    assert manifest["volumes"]["vol00"] == ["vol00_0000", "vol00_0001", "vol00_0002"]


def test_default_split_of_sliced_volumes_puts_each_volume_in_exactly_one_split(sliced: Path):
    recipe = load_recipe("unet", ["data.size=32"])
    data = SegmentationDataModule(recipe, sliced)
    _assert_volumes_whole(data.splits, {c.stem for c in data.layout.cases})
    assert data.splits["test"] and data.splits["val"] and data.splits["train"]
    assert "grouped by volume" in data.split_source and "grouped by volume" in data.grouped_by
    # the same folder split stem by stem (no grouping) would cut volumes: the grouping is what keeps them whole
    ungrouped = make_splits(discover(sliced), 0.1, 0.2, 0)[0]
    assert any(len({n for n, p in ungrouped.items() for s in p if _volume_of(s) == v}) > 1
               for v in {_volume_of(s) for s in ungrouped["train"]})


def test_grouped_split_is_deterministic_for_the_seed_and_near_the_fractions(sliced: Path):
    layout = discover(sliced)
    groups, _ = split_groups(layout, None)
    first = make_splits(layout, 0.1, 0.2, 3, groups, "by volume")[0]
    shuffled = dict(reversed(list(groups.items())))
    assert grouped_split(shuffled, 0.1, 0.2, 3) == first
    assert any(grouped_split(groups, 0.1, 0.2, seed) != first for seed in range(4, 8))
    total = len(groups)
    assert abs(len(first["test"]) - 0.2 * total) <= max(DEPTHS) / 2
    assert abs(len(first["val"]) - 0.1 * total) <= max(DEPTHS) / 2 or len({_volume_of(s) for s in first["val"]}) == 1


def test_groups_regex_keeps_patients_whole_on_a_plain_folder(tmp_path: Path):
    stems = [f"p{p:02d}_{k}" for p in range(6) for k in range(p % 3 + 2)]
    for stem in stems:
        write_image_atomic(tmp_path / "images" / f"{stem}.png", np.full((8, 8, 3), 90, np.uint8))
        write_image_atomic(tmp_path / "masks" / f"{stem}.png", np.zeros((8, 8), np.uint8))
    layout = discover(tmp_path)
    assert split_groups(layout, None) == (None, "")  # a plain folder is not grouped unless told
    groups, by = split_groups(layout, r"^(p\d+)_")
    splits, source = make_splits(layout, 0.2, 0.2, 0, groups, by)
    _assert_volumes_whole(splits, set(stems))
    assert all(splits.values()) and r"'^(p\\d+)_'" in source
    recipe = load_recipe("unet", ["data.size=32", r"data.split.groups=^(p\d+)_"])
    assert recipe.data.split.groups == r"^(p\d+)_"


def test_too_few_groups_are_refused_in_one_line(tmp_path: Path):
    one = Path(make_slices(_volumes(tmp_path / "volumes", depths=(6,)), tmp_path / "one")["out"])
    layout = discover(one)
    groups, by = split_groups(layout, None)
    with pytest.raises(MedsegError, match=r"only 1 group\(s\).*test=0.2") as err:
        make_splits(layout, 0.1, 0.2, 0, groups, by)
    assert "\n" not in str(err.value)
    with pytest.raises(MedsegError, match="only 2 group"):
        grouped_split({"a_0": "a", "a_1": "a", "b_0": "b"}, 0.1, 0.2, 0)
    assert grouped_split({"a_0": "a", "a_1": "a", "b_0": "b"}, 0.1, 0.0, 0)["test"] == []


def test_a_manifest_that_misses_slices_is_refused(sliced: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for sub in ("images", "masks"):
        (copy / sub).symlink_to(sliced / sub)
    (copy / MANIFEST).write_text(json.dumps({"volumes": {"vol00": ["vol00_0000"]}}))
    with pytest.raises(MedsegError, match="names no volume for .* data.split.groups"):
        split_groups(discover(copy), None)
    (copy / MANIFEST).write_text("[]")
    with pytest.raises(MedsegError, match="cannot read"):
        split_groups(discover(copy), None)


def test_study_folds_on_sliced_volumes_group_by_volume_by_default(sliced: Path):
    recipe = load_recipe("unet", ["data.size=32"])
    study = StudyFile(name="vols", models=[{"recipe": "unet"}], folds=3)
    folds = dataset_splits(study, sliced, recipe)
    assert len(folds) == 3 and all("grouped by volume" in source for _, _, source in folds)
    stems = {c.stem for c in discover(sliced).cases}
    for _, splits, _ in folds:
        _assert_volumes_whole(splits, stems)
    held_out = StudyFile(name="vols", models=[{"recipe": "unet"}])
    (_, splits, source), = dataset_splits(held_out, sliced, recipe)
    _assert_volumes_whole(splits, stems)
    assert "grouped by volume" in source
