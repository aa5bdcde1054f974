"""Volumes in every format medseg reads: NIfTI, NRRD and MHA give the same slices; DICOM series in HU, ordered by
position, chosen among several, with missing or duplicate slices refused in one line."""

import locale
import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import run_cli
from dicom_series import sitk_image, write_series
from medseg.data.volume_io import read_volume
from medseg.data.volumes import make_slices
from medseg.errors import MedsegError

SPACING = (0.7, 0.9, 2.5)
ORIGIN = (-20.0, 10.0, 35.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated 90 degrees about the slice normal
SLOPE, INTERCEPT = 2.0, -1024.0


def _phantom() -> np.ndarray:
    """16x16x6 (X, Y, Z) HU values, no two voxels alike, all of them (stored + intercept) * slope."""
    return (np.arange(16 * 16 * 6).reshape(16, 16, 6) * 2 - 1024).astype(np.int16)


def _image(voxels: np.ndarray) -> sitk.Image:
    return sitk_image(voxels, SPACING, ORIGIN, DIRECTION)


def _pairs(tmp_path, ext: str):
    root = tmp_path / ext.strip(".")
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    labels = np.zeros((16, 16, 6), np.uint8)
    labels[3, 9, 2] = 1
    sitk.WriteImage(_image(_phantom()), str(root / "images" / f"case01{ext}"))
    sitk.WriteImage(_image(labels), str(root / "labels" / f"case01{ext}"))
    return root


def _write_series(folder, voxels, uid, description, names=None):
    write_series(folder, voxels, uid, description, spacing=SPACING, origin=ORIGIN, direction=DIRECTION, slope=SLOPE,
                 intercept=INTERCEPT, names=names)


def test_nifti_mha_and_nrrd_give_the_same_voxels_geometry_and_slices(tmp_path):
    folders = {ext: _pairs(tmp_path, ext) for ext in (".nii.gz", ".mha", ".nrrd")}
    for ext, root in folders.items():
        volume = read_volume(root / "images" / f"case01{ext}")
        np.testing.assert_array_equal(volume.array, _phantom())
        np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
        np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-5)
        np.testing.assert_allclose(volume.direction, DIRECTION, atol=1e-5)
        make_slices(root, tmp_path / f"out{ext}", window=(-1024, 500))
    # the NIfTI route is nibabel's: its voxel order is what slices were always written from
    nifti = np.asarray(nib.load(folders[".nii.gz"] / "images" / "case01.nii.gz").dataobj)
    np.testing.assert_array_equal(nifti, _phantom())
    for k in range(6):
        name = f"case01_{k:04d}.png"
        reference = [np.array(Image.open(tmp_path / "out.nii.gz" / d / name)) for d in ("images", "masks")]
        for ext in (".mha", ".nrrd"):
            for d, expected in zip(("images", "masks"), reference):
                np.testing.assert_array_equal(np.array(Image.open(tmp_path / f"out{ext}" / d / name)), expected)
    assert np.array(Image.open(tmp_path / "out.mha" / "masks" / "case01_0002.png"))[9, 3] == 255


def test_dicom_series_reads_hu_in_position_order_even_when_files_are_shuffled(tmp_path):
    names = [f"IM{i:03d}.dcm" for i in range(6)]
    random.Random(3).shuffle(names)
    assert names != sorted(names)
    _write_series(tmp_path / "series", _phantom(), "1.2.3.4.1", "axial CT", names)
    raw = pydicom.dcmread(tmp_path / "series" / names[0])
    assert float(raw.RescaleSlope) == SLOPE and float(raw.RescaleIntercept) == INTERCEPT
    np.testing.assert_array_equal(raw.pixel_array.T, (_phantom()[:, :, 0] - INTERCEPT) / SLOPE)  # stored != HU
    before = locale.setlocale(locale.LC_ALL)
    volume = read_volume(tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM's "C" locale is undone: text files stay UTF-8
    np.testing.assert_array_equal(volume.array, _phantom())
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(volume.direction, DIRECTION, atol=1e-5)


def test_slices_pairs_a_dicom_folder_with_a_label_file_and_matches_the_nifti_slices(tmp_path):
    nifti = _pairs(tmp_path, ".nii.gz")
    root = tmp_path / "dicom"
    _write_series(root / "images" / "case01", _phantom(), "1.2.3.4.1", "axial CT")
    (root / "labels").mkdir()
    shutil.copy(nifti / "labels" / "case01.nii.gz", root / "labels" / "case01.nii.gz")
    make_slices(nifti, tmp_path / "from_nifti", window=(-200, 200))
    result = run_cli("slices", str(root), "--out", str(tmp_path / "from_dicom"), "--window=-200,200")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 slices from 1 volumes" in result.stdout
    for k in range(6):
        name = f"images/case01_{k:04d}.png"
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "from_dicom" / name)),
                                      np.array(Image.open(tmp_path / "from_nifti" / name)))
    assert (tmp_path / "from_dicom" / "slices.json").is_file()


def test_a_label_on_another_grid_than_its_dicom_image_is_refused(tmp_path):
    root = tmp_path / "flipped"
    _write_series(root / "images" / "case01", _phantom(), "1.2.3.4.1", "axial CT")
    (root / "labels").mkdir()
    label = _image(np.zeros((16, 16, 6), np.uint8))
    label.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))  # what another converter may have flipped
    sitk.WriteImage(label, str(root / "labels" / "case01.nrrd"))
    with pytest.raises(MedsegError, match=r"case01 and case01.nrrd lie on different voxel grids \(directions "):
        make_slices(root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_series_in_one_folder_are_refused_in_one_line_until_one_is_picked(tmp_path):
    _write_series(tmp_path / "both", _phantom(), "1.2.3.4.1", "axial CT")
    _write_series(tmp_path / "both", _phantom()[:, :, :4] + 100, "1.2.3.4.2", "contrast")
    with pytest.raises(MedsegError) as refused:
        read_volume(tmp_path / "both")
    message = str(refused.value)
    assert "\n" not in message and "holds 2 DICOM series" in message and "--series UID" in message
    assert '1.2.3.4.1 ("axial CT", 6 slices)' in message and '1.2.3.4.2 ("contrast", 4 slices)' in message
    np.testing.assert_array_equal(read_volume(tmp_path / "both", "1.2.3.4.2").array, _phantom()[:, :, :4] + 100)
    with pytest.raises(MedsegError, match="has no DICOM series 9.9; it holds 1.2.3.4.1"):
        read_volume(tmp_path / "both", "9.9")


def test_missing_slice_and_duplicate_position_are_one_line(tmp_path):
    _write_series(tmp_path / "gap", _phantom(), "1.2.3.4.1", "axial CT")
    (tmp_path / "gap" / "1.2.3.4.1.3.dcm").unlink()
    with pytest.raises(MedsegError, match=r"about 1 slice\(s\) missing: the position jumps by 5.00 mm after "
                                          r"1.2.3.4.1.2.dcm where slices are 2.50 mm apart") as missing:
        read_volume(tmp_path / "gap")
    assert "\n" not in str(missing.value)
    _write_series(tmp_path / "twice", _phantom(), "1.2.3.4.1", "axial CT")
    shutil.copy(tmp_path / "twice" / "1.2.3.4.1.2.dcm", tmp_path / "twice" / "copy.dcm")
    repeated = r"1 slice\(s\) repeat a position already taken \(1.2.3.4.1.2.dcm and copy.dcm both at"
    with pytest.raises(MedsegError, match=repeated) as duplicate:
        read_volume(tmp_path / "twice")
    assert "\n" not in str(duplicate.value)


def test_pydicom_ct_small_reads_as_a_one_slice_series_in_hu(tmp_path):
    source = pydicom.data.get_testdata_file("CT_small.dcm")
    (tmp_path / "ct").mkdir()
    shutil.copy(source, tmp_path / "ct" / "CT_small.dcm")
    volume = read_volume(tmp_path / "ct")
    dataset = pydicom.dcmread(source)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert volume.array.shape == (128, 128, 1)
    np.testing.assert_array_equal(volume.array[:, :, 0].T, expected)
    assert volume.array.min() < -500  # air in HU, not the stored values


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".dcm"])
def test_check_data_on_a_volume_folder_checks_the_volumes(tmp_path, ext):
    folder = tmp_path / "volumes"
    if ext == ".dcm":  # a series' files right in images/: neither 2D nor a volume folder, and the message says so
        _write_series(folder / "images", _phantom(), "1.2.3.4.1", "axial CT")
    else:
        folder = _pairs(tmp_path, ext)
    result = run_cli("check-data", str(folder))
    output = result.stdout + result.stderr
    if ext == ".dcm":
        assert result.returncode == 2 and "put its folder in VOLUMES/images/" in output, output[-2000:]
    else:
        assert result.returncode == 0, output[-2000:]
        assert "1 volume pair, 6 slices" in output and "label values {0, 1}" in output
    assert "convert it to NIfTI" not in output
