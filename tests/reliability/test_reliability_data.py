"""Reliability catalogue, data side: bad data folders given to `medseg check-data`, `medseg train` and
`medseg predict`. Every case asserts the exit status, the one clear line (what is wrong, which file, what to
do) or the report line, that the inputs are byte-identical afterwards and that nothing half-written remains.

The phantom fixture is shared by the session: each case damages its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import TINY, leftovers, medseg_inprocess, snapshot

STEM = "phantom_0000"  # the case each damage is done to
OTHER = "phantom_0001"
TRAIN_SETTINGS = [arg for setting in (*TINY[:-1], "train.epochs=1") for arg in ("--set", setting)]


@pytest.fixture()
def data(phantom: Path, tmp_path: Path) -> Path:
    """A private copy of the phantom (24 RGB 64 px pairs, 0/255 masks) to damage."""
    return Path(shutil.copytree(phantom, tmp_path / "data"))


def _replace(path: Path, new_name: str | None = None) -> Path:
    """Remove `path`; return where its replacement goes (same folder, `new_name` or the same name)."""
    path.unlink()
    return path.with_name(new_name or path.name)


def _float_tiff(path: Path, bad: float | None = None, count: int = 3, low: float = 0.0, high: float = 1.0) -> None:
    pixels = np.random.default_rng(0).uniform(low, high, (64, 64)).astype(np.float32)
    if bad is not None:
        pixels.flat[:count] = bad
    tifffile.imwrite(path, pixels)


def _save(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def _binary_mask(value: int = 255, size: int = 64) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:size // 2, size // 4:size // 2] = value
    return mask


class Checked:
    """`medseg check-data` run on a folder, with the folder's bytes before and after."""

    def __init__(self, folder: Path, *flags: str, before: dict[str, bytes] | None = None):
        before = snapshot(folder) if before is None else before
        self.result = medseg_inprocess("check-data", str(folder), *flags)
        assert "Traceback" not in self.result.stderr + self.result.stdout, self.result.stderr
        assert snapshot(folder) == before, "check-data changed its input"
        assert leftovers(folder) == []
        self.lines = [line for line in self.result.stdout.splitlines() if line.strip()]

    def report_line(self, level: str, kind: str) -> str:
        """The single report line of `kind` (problems are grouped: one line per problem, not per file)."""
        found = [line for line in self.lines if line.split()[:2] == [level, kind]]
        assert len(found) == 1, self.result.stdout
        return " ".join(found[0].split())


def _assert_in(line: str, *parts: str) -> None:
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"


# ------------------------------------------------------------------------------------------ check-data: one file
# (damage, level, kind, what the line must say); each damage is done to the case STEM of a phantom copy.


def _nan_image(d: Path) -> None:
    _float_tiff(_replace(d / "images" / f"{STEM}.png", f"{STEM}.tif"), bad=np.nan, count=5)


def _inf_image(d: Path) -> None:
    _float_tiff(_replace(d / "images" / f"{STEM}.png", f"{STEM}.tif"), bad=-np.inf, count=2)


def _empty_image(d: Path) -> None:
    (d / "images" / f"{STEM}.png").write_bytes(b"")


def _empty_mask(d: Path) -> None:
    (d / "masks" / f"{STEM}.png").write_bytes(b"")


def _truncated_image(d: Path) -> None:
    path = d / "images" / f"{STEM}.png"
    path.write_bytes(path.read_bytes()[:200])


def _small_mask(d: Path) -> None:
    _save(d / "masks" / f"{STEM}.png", _binary_mask(size=32))


def _colour_mask(d: Path) -> None:
    _save(d / "masks" / f"{STEM}.png", np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _nan_mask(d: Path) -> None:
    mask = _binary_mask(1).astype(np.float32)
    mask[0, 0] = np.nan
    tifffile.imwrite(_replace(d / "masks" / f"{STEM}.png", f"{STEM}.tif"), mask)


def _fractional_mask(d: Path) -> None:
    tifffile.imwrite(_replace(d / "masks" / f"{STEM}.png", f"{STEM}.tif"), _binary_mask(1).astype(np.float32) * 0.5)


def _broken_link_mask(d: Path) -> None:
    os.symlink(d / "elsewhere" / f"{STEM}.png", _replace(d / "masks" / f"{STEM}.png"))


def _broken_link_image(d: Path) -> None:
    os.symlink("../../moved/away.png", _replace(d / "images" / f"{STEM}.png"))


def _folder_as_mask(d: Path) -> None:
    _replace(d / "masks" / f"{STEM}.png").mkdir()


def _no_mask(d: Path) -> None:
    (d / "masks" / f"{STEM}.png").unlink()


def _no_image(d: Path) -> None:
    (d / "images" / f"{STEM}.png").unlink()


def _twin_image(d: Path) -> None:
    shutil.copy(d / "images" / f"{STEM}.png", d / "images" / f"{STEM}.bmp")


def _tiff_stack(d: Path) -> None:
    tifffile.imwrite(_replace(d / "images" / f"{STEM}.png", f"{STEM}.tif"), np.zeros((9, 64, 64), np.uint8))


def _complex_tiff(d: Path) -> None:
    tifffile.imwrite(_replace(d / "images" / f"{STEM}.png", f"{STEM}.tif"), np.ones((64, 64), np.complex64))


def _bad_splits_file(d: Path) -> None:
    (d / "splits.json").write_bytes(b"\xff\xfe{not json")


def _splits_ghost_stem(d: Path) -> None:
    (d / "splits.json").write_text(json.dumps({"train": ["ghost", STEM], "val": [OTHER]}))


def _only_volumes(d: Path) -> None:
    for folder in ("images", "masks"):
        shutil.rmtree(d / folder)
        (d / folder).mkdir()
        (d / folder / "case1.nii.gz").write_bytes(b"\x1f\x8b not really gzip")


ONE_FILE_CASES = {
    "nan-pixels": (_nan_image, "error", "non-finite", [f"images/{STEM}.tif [5 of 4096 pixels]", "NaN or Inf",
                                                         "numpy.nan_to_num"]),
    "inf-pixels": (_inf_image, "error", "non-finite", [f"images/{STEM}.tif [2 of 4096 pixels]", "NaN or Inf"]),
    "empty-image": (_empty_image, "error", "unreadable", [f"images/{STEM}.png", "empty (0 bytes)", "export it"]),
    "empty-mask": (_empty_mask, "error", "unreadable", [f"masks/{STEM}.png", "cannot read mask", "empty (0 bytes)"]),
    "truncated-image": (_truncated_image, "error", "unreadable", [f"images/{STEM}.png", "cannot read image",
                                                                  "re-export it"]),
    "mask-size": (_small_mask, "error", "size-mismatch", [f"masks/{STEM}.png [mask 32x32, images/{STEM}.png 64x64",
                                                          "save the mask at its image's size"]),
    "colour-mask": (_colour_mask, "error", "unreadable", [f"masks/{STEM}.png", "colour image", "single-channel"]),
    "nan-mask": (_nan_mask, "error", "unreadable", [f"masks/{STEM}.tif", "NaN or Inf", "integer label images"]),
    "fractional-mask": (_fractional_mask, "error", "unreadable", [f"masks/{STEM}.tif", "fractional"]),
    "broken-link-mask": (_broken_link_mask, "error", "broken-link", [f"masks/{STEM}.png [-> ", f"elsewhere/{STEM}.png]",
                                                                     "broken symbolic link", "fix the link"]),
    "broken-link-image": (_broken_link_image, "error", "broken-link", [f"images/{STEM}.png [-> ../../moved/away.png]",
                                                                       "broken symbolic link"]),
    "folder-as-mask": (_folder_as_mask, "error", "not-a-file", [f"masks/{STEM}.png", "a folder named like an image",
                                                                "put the file in its place"]),
    "no-mask": (_no_mask, "error", "unpaired-image", [f"images/{STEM}.png [no masks/{STEM}.png]", "has no mask"]),
    "no-image": (_no_image, "error", "unpaired-mask", [f"masks/{STEM}.png [no images/{STEM}.*]", "has no image"]),
    "twin-image": (_twin_image, "error", "duplicate-stem", [f"images/{STEM}.bmp [also images/{STEM}.png]",
                                                            f"images/{STEM}.png [also images/{STEM}.bmp]",
                                                            "keep one of them"]),
    "tiff-stack": (_tiff_stack, "error", "unreadable", [f"images/{STEM}.tif", "(9, 64, 64)", "one 2D slice per file"]),
    "complex-tiff": (_complex_tiff, "error", "unreadable", [f"images/{STEM}.tif", "complex64", "8- or 16-bit"]),
    "splits-not-json": (_bad_splits_file, "error", "splits", ["splits.json", "cannot read", "train/val/test"]),
    "splits-ghost-stem": (_splits_ghost_stem, "error", "splits", ["splits.json", "['ghost']", "fix the file"]),
    # images/ + masks/ of volumes is a volume folder: check-data checks the volumes (issue 17)
    "only-volumes": (_only_volumes, "error", "unreadable", ["images/case1.nii.gz", "cannot read volume"]),
}


@pytest.mark.parametrize("case", ONE_FILE_CASES)
def test_check_data_reports_a_damaged_file(data, case):
    damage, level, kind, says = ONE_FILE_CASES[case]
    damage(data)
    checked = Checked(data)
    assert checked.result.returncode == 1
    _assert_in(checked.report_line(level, kind), *says)
    assert "error(s)" in checked.lines[-1]


def test_check_data_names_its_own_flags_for_mask_values(data):
    _save(data / "masks" / f"{STEM}.png", _binary_mask(7))
    checked = Checked(data)
    assert checked.result.returncode == 1
    line = checked.report_line("error", "mask-values")
    _assert_in(line, f"masks/{STEM}.png", "values {0, 7}", "--mask-threshold", "--num-classes (> 2)")
    assert "model.num_classes" not in line and "data.mask_threshold" not in line


def test_check_data_multiclass_out_of_range_names_the_flag(data):
    for path in (data / "masks").glob("*.png"):  # label masks 0..2
        _save(path, np.asarray(Image.open(path)) // 255)
    _save(data / "masks" / f"{STEM}.png", _binary_mask(5))
    checked = Checked(data, "--num-classes", "3")
    assert checked.result.returncode == 1
    _assert_in(checked.report_line("error", "mask-values"), f"masks/{STEM}.png", "{5}", "labels 0..2",
               "set --num-classes")


def test_check_data_with_a_recipe_names_the_recipe_keys(data):
    _save(data / "masks" / f"{STEM}.png", _binary_mask(7))
    checked = Checked(data, "--recipe", "unet")
    _assert_in(checked.report_line("error", "mask-values"), "data.mask_threshold", "model.num_classes")


def test_check_data_jpeg_mask_warning_names_the_flag(data):
    Image.open(data / "masks" / f"{STEM}.png").save(_replace(data / "masks" / f"{STEM}.png", f"{STEM}.jpg"))
    checked = Checked(data, "--mask-threshold", "127")
    assert checked.result.returncode == 0
    _assert_in(checked.report_line("warning", "mask-format"), f"masks/{STEM}.jpg", "--mask-threshold")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_check_data_reports_an_unreadable_file(data):
    path = data / "images" / f"{STEM}.png"
    before = snapshot(data)
    path.chmod(0)
    try:
        result = medseg_inprocess("check-data", str(data))
    finally:
        path.chmod(0o644)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = next(line for line in result.stdout.splitlines() if "unreadable" in line)
    _assert_in(line, f"images/{STEM}.png", "permission denied", "chmod a+r")
    assert snapshot(data) == before and leftovers(data) == []


# ------------------------------------------------------------------------------------------ check-data: warnings


def test_check_data_warns_about_a_volume_among_images_and_passes(data):
    (data / "images" / "scan.nii.gz").write_bytes(b"\x1f\x8b")
    checked = Checked(data)
    assert checked.result.returncode == 0
    _assert_in(checked.report_line("warning", "not-2d"), "images/scan.nii.gz", "ignored", "medseg slices")


def test_check_data_warns_about_a_dicom_file(data):
    (data / "masks" / "slice.dcm").write_bytes(b"\0" * 132 + b"DICM")
    checked = Checked(data)
    assert checked.result.returncode == 0
    _assert_in(checked.report_line("warning", "not-2d"), "masks/slice.dcm", "DICOM", "export the image as PNG")


def test_check_data_warns_about_float_images_outside_0_1(data):
    for stem in (STEM, OTHER):
        _float_tiff(_replace(data / "images" / f"{stem}.png", f"{stem}.tif"), low=-2.0, high=300.0)
    checked = Checked(data)
    assert checked.result.returncode == 0
    _assert_in(checked.report_line("warning", "intensity-range"), "2 files", f"images/{STEM}.tif [values in [-",
               "rescale it to [0, 1]")


def test_check_data_groups_16_bit_images_into_one_line(data):
    for path in sorted((data / "images").glob("*.png")):
        gray = np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257
        _save(path, gray)
    checked = Checked(data)
    assert checked.result.returncode == 0
    _assert_in(checked.report_line("info", "bit-depth"), "24 files (images/phantom_0000.png, "
               "images/phantom_0001.png, images/phantom_0002.png, ...)", "16-bit")
    assert len(checked.lines) <= 5


def test_check_data_lists_ignored_files_and_subfolders_as_information(data):
    (data / "images" / "notes.txt").write_text("scanned on Tuesday\n")
    (data / "masks" / "old").mkdir()
    checked = Checked(data)
    assert checked.result.returncode == 0
    ignored = [" ".join(line.split()) for line in checked.lines if line.split()[:2] == ["info", "ignored"]]
    assert len(ignored) == 2  # two different reasons, two lines
    _assert_in(ignored[0], "images/notes.txt", "not an image medseg reads (.png")
    _assert_in(ignored[1], "masks/old", "sub-folder ignored")


# ------------------------------------------------------------------------------------------ check-data: grouping


def _tiny_pairs(root: Path, n: int, mask_value: int) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    image = Image.fromarray(np.full((8, 8), 120, np.uint8))
    mask = Image.fromarray(np.where(np.eye(8, dtype=bool), mask_value, 0).astype(np.uint8))
    for i in range(n):
        image.save(root / "images" / f"p{i:04d}.png")
        mask.save(root / "masks" / f"p{i:04d}.png")


def test_check_data_on_1000_files_with_one_problem_prints_a_handful_of_lines(tmp_path):
    root = tmp_path / "many"
    _tiny_pairs(root, 1000, mask_value=7)
    checked = Checked(root)
    assert checked.result.returncode == 1
    assert len(checked.lines) <= 5, checked.result.stdout
    _assert_in(checked.report_line("error", "mask-values"),
               "1000 files (masks/p0000.png, masks/p0001.png, masks/p0002.png, ...): mask has values {0, 7}")
    assert "1000 error(s)" in checked.lines[-1]

    every = Checked(root, "--all")
    assert sum(line.startswith("error") for line in every.lines) == 1000


def test_check_data_keeps_different_problems_on_separate_lines(data):
    _save(data / "masks" / f"{STEM}.png", _binary_mask(7))
    _save(data / "masks" / f"{OTHER}.png", _binary_mask(7))
    _save(data / "masks" / "phantom_0002.png", _binary_mask(9))
    checked = Checked(data)
    lines = [line for line in checked.lines if line.startswith("error")]
    assert len(lines) == 2
    assert "2 files" in lines[0] and "{0, 7}" in lines[0] and "{0, 9}" in lines[1] and "phantom_0002" in lines[1]


def test_check_data_groups_noisy_masks_whose_value_sets_differ(data):
    rng = np.random.default_rng(2)
    for stem in (STEM, OTHER, "phantom_0002"):
        _save(data / "masks" / f"{stem}.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
    checked = Checked(data)
    _assert_in(checked.report_line("error", "mask-values"), "3 files", "more than 8 distinct values",
               f"masks/{STEM}.png [values {{0, 1,")


# ------------------------------------------------------------------------------------------ not a data folder


def test_check_data_on_a_file(tmp_path):
    target = tmp_path / "scan.png"
    target.write_bytes(b"x")
    result = medseg_inprocess("check-data", str(target))
    assert result.returncode == 2
    _assert_in(result.error_line(), str(target), "is a file, not a folder", "images/ and masks/")


def test_check_data_on_empty_folders(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / "d" / folder).mkdir(parents=True)
    checked = Checked(tmp_path / "d")
    assert checked.result.returncode == 1
    _assert_in(checked.report_line("error", "no-cases"), "no image/mask pairs", "matching file names")


def test_check_data_when_images_is_a_broken_link(data):
    shutil.rmtree(data / "images")
    os.symlink(data / "gone", data / "images")
    result = medseg_inprocess("check-data", str(data))
    assert result.returncode == 2
    _assert_in(result.error_line(), "images is a broken link", str(data / "gone"), "fix the link")


def test_check_data_on_a_3d_nnunet_dataset(tmp_path):
    root = tmp_path / "Dataset009_Liver"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    before = snapshot(root)
    result = medseg_inprocess("check-data", str(root))
    assert result.returncode == 2
    _assert_in(result.error_line(), "file_ending '.nii.gz'", "medseg slices")
    assert snapshot(root) == before


def test_check_data_on_an_nnunet_dataset_with_a_broken_link(tmp_path):
    root = tmp_path / "Dataset010_Pairs"
    meta = {"channel_names": {"0": "gray"}, "labels": {"background": 0, "x": 1}, "file_ending": ".png"}
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in ("a", "b"):
        _save(root / "imagesTr" / f"{case}_0000.png", np.full((16, 16), 90, np.uint8))
        _save(root / "labelsTr" / f"{case}.png", _binary_mask(1, size=16))
    os.symlink("/nowhere/b.png", _replace(root / "labelsTr" / "b.png"))
    checked = Checked(root)
    assert checked.result.returncode == 1
    _assert_in(checked.report_line("error", "broken-link"), "labelsTr/b.png [-> /nowhere/b.png]")
    assert not any("unpaired" in line for line in checked.lines)  # the link is the one problem, not its image


# ------------------------------------------------------------------------------------------ train refuses


def _refuses_to_train(data: Path, out: Path) -> str:
    before = snapshot(data)
    result = medseg_inprocess("train", "--recipe", "unet", "--data", str(data), "--out", str(out), *TRAIN_SETTINGS)
    assert result.returncode == 2, result.stderr
    assert not out.exists() or not any(out.iterdir()), "train created a run folder for bad data"
    assert snapshot(data) == before and leftovers(data) == []
    return result.error_line()


TRAIN_CASES = {
    "nan-pixels": (_nan_image, [f"images/{STEM}.tif [5 of 4096 pixels]", "NaN or Inf", "medseg check-data"]),
    "broken-link": (_broken_link_mask, [f"masks/{STEM}.png [-> ", "broken symbolic link"]),
    "only-volumes": (_only_volumes, ["no image/mask pairs", "medseg slices"]),
    "splits-not-json": (_bad_splits_file, ["splits.json", "cannot read"]),
}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_refuses_bad_data_before_creating_a_run(data, tmp_path, case):
    damage, says = TRAIN_CASES[case]
    damage(data)
    _assert_in(_refuses_to_train(data, tmp_path / "runs"), *says)


def test_train_names_the_recipe_keys_for_mask_values(data, tmp_path):
    _save(data / "masks" / f"{STEM}.png", _binary_mask(7))
    line = _refuses_to_train(data, tmp_path / "runs")
    _assert_in(line, f"masks/{STEM}.png", "values {0, 7}", "data.mask_threshold", "model.num_classes")
    assert "--num-classes" not in line


# ------------------------------------------------------------------------------------------ predict refuses


def test_predict_points_a_volume_to_medseg_slices(tiny_run, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"\x1f\x8b\x08 a volume")
    result = medseg_inprocess("predict", str(tiny_run.path), str(scan), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    line = result.error_line()
    _assert_in(line, str(scan), "NIfTI volume", "medseg slices")
    assert "image viewer" not in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_predict_refuses_an_image_with_nan_pixels(tiny_run, tmp_path):
    image = tmp_path / "nan.tif"
    _float_tiff(image, bad=np.nan, count=4)
    before = image.read_bytes()
    result = medseg_inprocess("predict", str(tiny_run.path), str(image), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    _assert_in(result.error_line(), str(image), "4 NaN or Inf pixel(s)", "numpy.nan_to_num")
    assert image.read_bytes() == before
    out = tmp_path / "o"
    assert not out.exists() or (not any(out.iterdir()) and leftovers(out) == [])
