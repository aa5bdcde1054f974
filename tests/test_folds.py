import random
import shutil

import numpy as np
import pytest
from PIL import Image

from medseg.data.folds import empty_mask_strata, fold_splits, groups_of, kfold
from medseg.data.formats import discover
from medseg.errors import MedsegError

PATTERN = "^(?P<group>[^_]+)_"
# 20 patients with 1 to 4 slices each (five of each count, 50 stems); five patients of mixed sizes have
# lesions on every slice
SLICES = [1 + (i * 7) % 4 for i in range(20)]
STEMS = [f"p{i + 1:02d}_{chr(ord('a') + j)}" for i, n in enumerate(SLICES) for j in range(n)]
POSITIVE = {"p01", "p02", "p05", "p06", "p10"}
STRATA = {stem: stem.split("_")[0] in POSITIVE for stem in STEMS}


def patient(stem: str) -> str:
    return stem.split("_")[0]


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_groups_of_takes_the_named_group_the_first_group_or_the_whole_match():
    assert groups_of(["p01_a", "p01_b", "p02_a"], PATTERN) == {"p01_a": "p01", "p01_b": "p01", "p02_a": "p02"}
    assert groups_of(["case7-slice3", "case12-slice1"], r"case(\d+)-") == {"case7-slice3": "7", "case12-slice1": "12"}
    assert groups_of(["vol1_s1", "vol2_s9"], r"vol\d") == {"vol1_s1": "vol1", "vol2_s9": "vol2"}
    assert groups_of(["b", "a"], None) == {"a": "a", "b": "b"}


def test_groups_of_refuses_stems_the_pattern_does_not_match():
    with pytest.raises(MedsegError) as excinfo:
        groups_of(["p01_a", "nounderscore", "zz", "p02_b"], PATTERN)
    message = one_line_error(excinfo)
    assert "'nounderscore'" in message and "2 of 4 stems" in message and PATTERN in message


def test_groups_of_refuses_an_invalid_regex():
    with pytest.raises(MedsegError) as excinfo:
        groups_of(["p01_a"], "^(?P<group>[^_]+_")
    assert "not a valid regular expression" in one_line_error(excinfo)


@pytest.mark.parametrize("k", [2, 3, 5, 20])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_folds_cover_every_stem_once_keep_groups_whole_and_are_balanced(k, seed):
    groups = groups_of(STEMS, PATTERN)
    folds = kfold(STEMS, k, groups, seed=seed)
    assert len(folds) == k and all(folds)
    flat = [stem for fold in folds for stem in fold]
    assert sorted(flat) == sorted(STEMS) and len(flat) == len(set(flat))
    fold_of_group = {}
    for index, fold in enumerate(folds):
        assert fold == sorted(fold)
        for stem in fold:
            assert fold_of_group.setdefault(patient(stem), index) == index
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= max(SLICES)


@pytest.mark.parametrize("seed", range(6))
def test_stratified_folds_spread_the_positive_groups_and_stay_balanced(seed):
    groups = groups_of(STEMS, PATTERN)
    folds = kfold(STEMS, 5, groups, strata=STRATA, seed=seed)
    assert sorted(s for fold in folds for s in fold) == sorted(STEMS)
    for fold in folds:
        assert len({patient(s) for s in fold if STRATA[s]}) == 1  # 5 positive patients, one per fold
    sizes = [len(fold) for fold in folds]
    assert max(sizes) - min(sizes) <= max(SLICES)


def test_stratified_folds_stay_balanced_when_the_labels_pull_the_other_way():
    sizes = {"g00": 2, "g01": 8, "g02": 8, "g03": 2, "g04": 2, "g05": 2, "g06": 3, "g07": 8}
    stems = [f"{g}_{j}" for g, n in sizes.items() for j in range(n)]
    strata = {s: s.startswith("g01_") for s in stems}
    folds = kfold(stems, 3, groups_of(stems, PATTERN), strata=strata, seed=0)
    assert max(map(len, folds)) - min(map(len, folds)) <= 8


def test_stratification_follows_each_groups_majority_label():
    # slice-level labels: a patient with 2 of 3 positive slices counts as positive
    stems = [f"q{i}_{j}" for i in range(8) for j in range(3)]
    strata = {s: s.startswith(("q1_", "q4_")) or s in {"q6_0", "q6_1"} for s in stems}
    folds = kfold(stems, 3, groups_of(stems, PATTERN), strata=strata)
    holding = [{patient(s) for s in fold} & {"q1", "q4", "q6"} for fold in folds]
    assert all(len(found) == 1 for found in holding)


def test_folds_are_deterministic_for_a_seed_and_independent_of_the_input_order():
    groups = groups_of(STEMS, PATTERN)
    reference = kfold(STEMS, 5, groups, strata=STRATA, seed=3)
    shuffled = list(STEMS)
    random.Random(11).shuffle(shuffled)
    assert kfold(shuffled, 5, groups_of(shuffled, PATTERN), strata=STRATA, seed=3) == reference
    assert kfold(STEMS, 5, groups, strata=STRATA, seed=3) == reference
    assert any(kfold(STEMS, 5, groups, strata=STRATA, seed=s) != reference for s in range(4, 8))
    splits = fold_splits(STEMS, 5, groups, strata=STRATA, seed=3)
    assert fold_splits(shuffled, 5, groups_of(shuffled, PATTERN), strata=STRATA, seed=3) == splits


@pytest.mark.parametrize("val_fraction", [0.1, 0.25])
def test_fold_splits_keep_each_group_in_one_of_train_val_test(val_fraction):
    groups = groups_of(STEMS, PATTERN)
    splits = fold_splits(STEMS, 5, groups, strata=STRATA, seed=0, val_fraction=val_fraction)
    assert [split["test"] for split in splits] == kfold(STEMS, 5, groups, strata=STRATA, seed=0)
    for split in splits:
        assert set(split) == {"train", "val", "test"}
        assert all(split[name] == sorted(split[name]) and split[name] for name in split)
        assert sorted(split["train"] + split["val"] + split["test"]) == sorted(STEMS)
        patients = {name: {patient(s) for s in split[name]} for name in split}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"] and not patients["val"] & patients["test"]
        n_train = len(split["train"]) + len(split["val"])
        assert abs(len(split["val"]) - val_fraction * n_train) <= max(SLICES) / 2 or len(patients["val"]) == 1


def test_without_groups_every_stem_is_its_own_group():
    stems = [f"img{i:03d}" for i in range(23)]
    folds = kfold(stems, 5)
    assert sorted(len(fold) for fold in folds) == [4, 4, 5, 5, 5]
    assert sorted(s for fold in folds for s in fold) == stems


@pytest.mark.parametrize("k", [6, 30])
def test_more_folds_than_groups_is_refused(k):
    stems = ["a_1", "a_2", "b_1", "c_1", "d_1", "e_1"]
    with pytest.raises(MedsegError) as excinfo:
        kfold(stems, k, groups_of(stems, PATTERN))
    message = one_line_error(excinfo)
    assert f"k={k} folds need at least {k} groups" in message and "only 5 group(s)" in message


@pytest.mark.parametrize("k", [1, 0, -2])
def test_fewer_than_two_folds_are_refused(k):
    with pytest.raises(MedsegError) as excinfo:
        kfold(STEMS, k, groups_of(STEMS, PATTERN))
    assert "at least 2 folds" in one_line_error(excinfo)


def test_fold_splits_refuse_folds_that_leave_no_group_for_validation():
    stems = ["a_1", "a_2", "b_1"]
    with pytest.raises(MedsegError) as excinfo:
        fold_splits(stems, 2, groups_of(stems, PATTERN))
    assert "too few to also hold out a validation group" in one_line_error(excinfo)


def test_stems_without_a_group_or_stratum_are_refused():
    groups = groups_of(STEMS, PATTERN)
    with pytest.raises(MedsegError) as excinfo:
        kfold([*STEMS, "extra_x"], 5, groups)
    assert "'extra_x' has no group" in one_line_error(excinfo)
    with pytest.raises(MedsegError) as excinfo:
        kfold(STEMS, 5, groups, strata={s: v for s, v in STRATA.items() if s != "p02_a"})
    assert "'p02_a' has no stratum" in one_line_error(excinfo)


def test_empty_mask_strata_reads_the_masks_of_a_real_folder(phantom, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(phantom, root)
    stems = sorted(p.stem for p in (root / "masks").glob("*.png"))
    blank = root / "masks" / f"{stems[1]}.png"
    Image.fromarray(np.zeros_like(np.asarray(Image.open(blank)))).save(blank)
    layout = discover(root)
    strata = empty_mask_strata(layout, stems, num_classes=1, mask_threshold=None)
    assert list(strata) == stems
    expected = {s: bool(np.asarray(Image.open(root / "masks" / f"{s}.png")).any()) for s in stems}
    assert strata == expected and strata[stems[1]] is False and sum(strata.values()) >= len(stems) // 2
    with pytest.raises(MedsegError):
        empty_mask_strata(layout, [*stems, "not_a_case"], num_classes=1, mask_threshold=None)
