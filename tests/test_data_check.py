"""The dataset integrity report (medseg.data.check): every problem found at once, with kind, level and file."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg.data.check import Problem, check_data
from medseg.errors import MedsegError

# Three of the smallest Kvasir pairs (352-401 px high), so decoding stays fast.
CLEAN = ["cju5hi52odyf90817prvcwg45", "cju40taxlkrho0987smigg0x0", "cju2rkjfwoxys0993x768l1j2"]


def _copy_pair(kvasir: Path, stem: str, dest: Path, new_stem: str | None = None, mask: bool = True) -> None:
    new_stem = new_stem or stem
    shutil.copy(kvasir / "images" / f"{stem}.jpg", dest / "images" / f"{new_stem}.jpg")
    if mask:
        shutil.copy(kvasir / "masks" / f"{stem}.png", dest / "masks" / f"{new_stem}.png")


@pytest.fixture(scope="module")
def broken_kvasir(kvasir, tmp_path_factory) -> Path:
    """Real Kvasir pairs plus one of each problem the report must find."""
    root = tmp_path_factory.mktemp("broken_kvasir")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for stem in CLEAN:
        _copy_pair(kvasir, stem, root)
    _copy_pair(kvasir, CLEAN[0], root, "no_mask", mask=False)
    jpeg = (kvasir / "images" / f"{CLEAN[1]}.jpg").read_bytes()
    _copy_pair(kvasir, CLEAN[1], root, "corrupt")
    (root / "images" / "corrupt.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])  # truncated: header is intact
    shutil.copy(kvasir / "images" / f"{CLEAN[0]}.jpg", root / "images" / "mismatch.jpg")  # 352 x 568
    shutil.copy(kvasir / "masks" / f"{CLEAN[1]}.png", root / "masks" / "mismatch.png")  # 393 x 622
    _copy_pair(kvasir, CLEAN[2], root, "three_values")
    labels = np.asarray(Image.open(kvasir / "masks" / f"{CLEAN[2]}.png")) // 255  # 0/1
    labels[:10, :10] = 2
    Image.fromarray(labels.astype(np.uint8)).save(root / "masks" / "three_values.png")
    _copy_pair(kvasir, CLEAN[0], root, "empty")
    Image.fromarray(np.zeros((352, 568), np.uint8)).save(root / "masks" / "empty.png")
    return root


def _find(report, file: str) -> list[Problem]:
    return [p for p in report.problems if p.file == file]


def test_every_planted_problem_is_reported_with_kind_level_and_file(broken_kvasir):
    report = check_data(broken_kvasir, workers=2)
    assert report.kind == "folder" and report.root == broken_kvasir
    assert report.n_cases == 7  # 3 clean + corrupt, mismatch, three_values, empty; no_mask is unpaired
    assert not report.ok

    found = {(p.level, p.kind, p.file) for p in report.problems}
    assert found == {
        ("error", "unpaired-image", "images/no_mask.jpg"),
        ("error", "unreadable", "images/corrupt.jpg"),
        ("error", "size-mismatch", "masks/mismatch.png"),
        ("error", "mask-values", "masks/three_values.png"),
        ("info", "empty-mask", "masks/empty.png"),
    }
    for stem in CLEAN:
        assert _find(report, f"images/{stem}.jpg") == [] and _find(report, f"masks/{stem}.png") == []

    (values,) = _find(report, "masks/three_values.png")
    assert "{0, 1, 2}" in values.message and "data.mask_threshold" in values.message
    (mismatch,) = _find(report, "masks/mismatch.png")
    assert "393x622" in mismatch.detail and "352x568" in mismatch.detail  # sizes vary per file: the detail
    (unreadable,) = _find(report, "images/corrupt.jpg")
    assert "cannot read image" in unreadable.message
    assert "masks/no_mask.png" in _find(report, "images/no_mask.jpg")[0].detail
    assert all("\n" not in p.message and p.file not in p.message for p in report.problems)

    assert [p.kind for p in report.errors] == ["unreadable", "unpaired-image", "size-mismatch", "mask-values"]
    assert [p.kind for p in report.infos] == ["empty-mask"] and report.warnings == []


def test_report_order_and_stats_are_deterministic(broken_kvasir):
    serial = check_data(broken_kvasir, workers=1)
    parallel = check_data(broken_kvasir, workers=2)
    assert serial.problems == parallel.problems and serial.stats == parallel.stats
    keys = [(p.file, p.kind) for p in serial.problems]
    assert keys == sorted(keys)
    stats = serial.stats
    assert stats["height"] == [352, 401] and stats["width"] == [568, 622]
    assert stats["channels"] == {3: 6} and stats["dtypes"] == {"uint8": 6}  # the corrupt image has no stats
    assert stats["label_values"] == [0, 1, 2, 255]
    assert stats["empty_masks"] == 1 and 0 < stats["mean_foreground_fraction"] < 0.5


def test_stems_restrict_the_check(broken_kvasir):
    report = check_data(broken_kvasir, stems={CLEAN[0], "empty", "no_mask", "ghost"})
    assert report.n_cases == 2
    assert {(p.kind, p.file) for p in report.problems} == {
        ("empty-mask", "masks/empty.png"),
        ("unpaired-image", "images/no_mask.jpg"),
        ("missing-case", "ghost"),
    }
    clean = check_data(broken_kvasir, stems=set(CLEAN))
    assert clean.ok and clean.problems == [] and clean.n_cases == 3


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_dataset_level_warnings_and_infos(tmp_path):
    disc = np.zeros((16, 16), np.uint8)
    disc[4:12, 4:12] = 255
    _save(tmp_path / "images" / "rgb.png", np.full((16, 16, 3), 90, np.uint8))
    _save(tmp_path / "masks" / "rgb.png", disc)
    _save(tmp_path / "images" / "rgb2.png", np.full((16, 16, 3), 90, np.uint8))
    _save(tmp_path / "masks" / "rgb2.png", np.full((16, 16), 255, np.uint8))
    _save(tmp_path / "images" / "gray16.png", np.full((16, 16), 4000, np.uint16))
    _save(tmp_path / "masks" / "gray16.png", disc)
    _save(tmp_path / "images" / "a.jpg", np.full((16, 16, 3), 90, np.uint8))
    _save(tmp_path / "images" / "a.png", np.full((16, 16, 3), 90, np.uint8))
    _save(tmp_path / "masks" / "a.png", disc)
    _save(tmp_path / "masks" / "orphan.png", disc)

    report = check_data(tmp_path)
    assert {(p.level, p.kind, p.file) for p in report.problems} == {
        ("warning", "full-mask", "masks/rgb2.png"),
        ("warning", "channels", "images/gray16.png"),
        ("info", "bit-depth", "images/gray16.png"),
        ("error", "duplicate-stem", "images/a.jpg"),
        ("error", "duplicate-stem", "images/a.png"),
        ("error", "unpaired-mask", "masks/orphan.png"),
    }
    (channels,) = [p for p in report.warnings if p.kind == "channels"]
    assert "1 channel(s) while 2 of 3 images have 3" in channels.message
    assert report.stats["dtypes"] == {"uint16": 1, "uint8": 2} and report.stats["full_masks"] == 1


def test_mask_modes_change_what_is_legal(tmp_path):
    _save(tmp_path / "images" / "x.png", np.full((8, 8), 50, np.uint8))
    _save(tmp_path / "masks" / "x.png", np.array([[0, 1, 2, 3] * 2] * 8, np.uint8))
    assert [p.kind for p in check_data(tmp_path).problems] == ["mask-values"]
    assert check_data(tmp_path, num_classes=4).problems == []
    (wrong,) = check_data(tmp_path, num_classes=3).problems
    assert wrong.kind == "mask-values" and "{3}" in wrong.message
    assert check_data(tmp_path, mask_threshold=1).ok  # values 2, 3 = foreground


def test_nnunet_channel_problems(tmp_path):
    root = tmp_path / "Dataset002_Pairs"
    root.mkdir()
    meta = {"channel_names": {"0": "a", "1": "b"}, "labels": {"background": 0, "x": 1}, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 1
    _save(root / "imagesTr" / "good_0000.png", np.zeros((8, 8), np.uint8))
    _save(root / "imagesTr" / "good_0001.png", np.zeros((8, 8), np.uint8))
    _save(root / "labelsTr" / "good.png", mask)
    _save(root / "imagesTr" / "skew_0000.png", np.zeros((8, 8), np.uint8))
    _save(root / "imagesTr" / "skew_0001.png", np.zeros((8, 9), np.uint8))
    _save(root / "labelsTr" / "skew.png", mask)
    _save(root / "imagesTr" / "half_0000.png", np.zeros((8, 8), np.uint8))
    _save(root / "labelsTr" / "half.png", mask)
    _save(root / "imagesTs" / "test_0000.png", np.zeros((8, 8), np.uint8))
    _save(root / "imagesTs" / "test_0001.png", np.zeros((8, 8), np.uint8))
    _save(root / "labelsTs" / "test.png", np.zeros((8, 7), np.uint8))

    report = check_data(root)
    assert report.kind == "nnunet" and report.n_cases == 3  # good, skew and the test case
    assert {(p.level, p.kind, p.file) for p in report.problems} == {
        ("error", "size-mismatch", "imagesTr/skew_0001.png"),
        ("error", "unpaired-image", "imagesTr/half_0000.png"),
        ("error", "unpaired-mask", "labelsTr/half.png"),
        ("error", "size-mismatch", "labelsTs/test.png"),
        ("info", "empty-mask", "labelsTs/test.png"),
    }
    (half,) = [p for p in report.problems if p.file == "imagesTr/half_0000.png"]
    assert "half_0001.png" in half.detail and "lacks channel file" in half.message


def test_not_a_dataset_is_a_medseg_error(tmp_path):
    with pytest.raises(MedsegError, match="expected DATA/images"):
        check_data(tmp_path)
