"""`medseg check-data VOLUMES` (medseg.data.volume_check): a good folder of NIfTI, NRRD, MHA and DICOM series
volumes passes with its summary (volumes, slices, spacing, anisotropy, label values); each planted problem is
reported once, at its level, naming its file; a 2D folder is still checked as a 2D folder."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import medseg_inprocess
from dicom_series import sitk_image, write_series
from medseg.data.volume_check import check_volumes
from medseg.data.volumes import is_volume_folder

SHAPE = (24, 20, 6)
SPACING = (0.8, 0.8, 2.5)
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
UIDS = ("1.2.826.0.1.3680043.2.1125.9.1", "1.2.826.0.1.3680043.2.1125.9.2")


def _phantom(seed: int, depth: int = SHAPE[2]) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, labels): an organ (1) holding a lesion (2)."""
    rng = np.random.default_rng(seed)
    shape = (*SHAPE[:2], depth)
    x, y, z = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    organ = ((x - 12) / 8) ** 2 + ((y - 10) / 6) ** 2 + ((z - depth / 2) / 3) ** 2 <= 1
    lesion = organ & (((x - 12) / 3) ** 2 + ((y - 10) / 3) ** 2 <= 1)
    image = rng.normal(40, 20, shape) + 200 * organ + 100 * lesion
    return image.astype(np.int16), (organ.astype(np.uint8) + lesion.astype(np.uint8))


def _nifti(array: np.ndarray, path: Path, spacing=SPACING, shift: float = 0.0) -> None:
    affine = np.diag([*spacing, 1.0])
    affine[0, 3] = shift
    nib.save(nib.Nifti1Image(array, affine), path)


def _itk(array: np.ndarray, path: Path, spacing=SPACING) -> None:
    sitk.WriteImage(sitk_image(array, spacing, (0.0, 0.0, 0.0), DIRECTION), str(path))


def _good(root: Path) -> Path:
    """Two NIfTI pairs (one with 1.5 mm slices), a NRRD pair, an MHA pair and a DICOM series with a NIfTI label."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(2):
        image, labels = _phantom(i)
        spacing = (0.8, 0.8, 1.5) if i else SPACING
        _nifti(image, root / "images" / f"nii{i}.nii.gz", spacing)
        _nifti(labels, root / "labels" / f"nii{i}.nii.gz", spacing)
    image, labels = _phantom(2)
    _itk(image, root / "images" / "nrrd.nrrd")
    _itk(labels, root / "labels" / "nrrd.nrrd")
    _itk(image, root / "images" / "mha.mha")
    _itk(labels, root / "labels" / "mha.mha")
    image, labels = _phantom(3, depth=4)
    write_series(root / "images" / "ct", image, UIDS[0], "phantom CT", spacing=SPACING, origin=(0.0, 0.0, 0.0),
                 direction=DIRECTION)
    # LPS (0, 0, 0) with identity direction is RAS diag(-1, -1, 1): the label's NIfTI affine says the same
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    nib.save(nib.Nifti1Image(labels, affine), root / "labels" / "ct.nii.gz")
    return root


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _good(tmp_path_factory.mktemp("good-volumes"))


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """One volume pair per problem, each named after it, plus a clean pair."""
    root = tmp_path_factory.mktemp("broken-volumes")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    image, label = _phantom(0)
    for stem in ("clean", "shape", "grid", "fractional", "negative", "nan_label", "empty", "unreadable"):
        _nifti(image, images / f"{stem}.nii.gz")
    _nifti(label, labels / "clean.nii.gz")
    _nifti(label[:, :, :-1], labels / "shape.nii.gz")
    _nifti(label, labels / "grid.nii.gz", shift=4.0)  # 4 mm off along x
    fractional = label.astype(np.float32)
    fractional[10, 10, 2] = 0.5
    _nifti(fractional, labels / "fractional.nii.gz")
    _nifti(label.astype(np.int16) - (label == 0).astype(np.int16) * (np.arange(SHAPE[2]) == 0), labels /
           "negative.nii.gz")
    nan_label = label.astype(np.float32)
    nan_label[0, 0, 0] = np.nan
    _nifti(nan_label, labels / "nan_label.nii.gz")
    _nifti(np.zeros_like(label), labels / "empty.nii.gz")
    (images / "unreadable.nii.gz").write_bytes(b"not a volume at all")
    _nifti(label, labels / "unreadable.nii.gz")
    nan_image = image.astype(np.float32)
    nan_image[1, 2, 3] = np.nan
    _nifti(nan_image, images / "nan_image.nii.gz")
    _nifti(label, labels / "nan_image.nii.gz")
    _nifti(image, images / "lonely.nii.gz")
    _nifti(label, labels / "orphan.nii.gz")
    (images / "notes.txt").write_text("scanner protocol")
    ct, ct_label = _phantom(3, depth=4)
    for uid, description in zip(UIDS, ("phantom CT", "second CT")):
        write_series(images / "two_series", ct, uid, description, spacing=SPACING, origin=(0.0, 0.0, 0.0),
                     direction=DIRECTION)
    nib.save(nib.Nifti1Image(ct_label, np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])),
             labels / "two_series.nii.gz")
    return root


def test_a_good_folder_of_every_format_passes_with_its_summary(good):
    assert is_volume_folder(good)
    report = check_volumes(good, workers=2)
    assert report.ok and report.warnings == [], [p.line() for p in report.problems]
    assert report.kind == "volumes" and report.n_cases == 5
    assert {p.kind for p in report.infos} == {"labels"}
    assert {p.file for p in report.infos} == {"labels/nii0.nii.gz", "labels/nii1.nii.gz", "labels/nrrd.nrrd",
                                              "labels/mha.mha", "labels/ct.nii.gz"}
    assert all(p.message == "label values {0, 1, 2}" for p in report.infos)
    assert len(report.groups()) == 1  # five volumes with one set of labels read as one line
    stats = report.stats
    assert stats["volumes"] == 5 and stats["slices"] == 4 * SHAPE[2] + 4
    assert stats["shape"] == [[24, 24], [20, 20], [4, 6]]
    assert stats["spacing_mm"][0] == pytest.approx([0.8, 0.8]) and stats["spacing_mm"][2] == pytest.approx([1.5, 2.5])
    assert stats["anisotropy"] == pytest.approx([1.5 / 0.8, 2.5 / 0.8])
    assert stats["label_values"] == [0, 1, 2] and stats["empty_labels"] == 0
    assert stats["dtypes"]["int16"] >= 4  # the DICOM series reads in HU, as its rescale makes it


def test_every_planted_problem_is_reported_with_its_file(broken):
    report = check_volumes(broken, workers=2)
    assert not report.ok and report.n_cases == 10  # 11 images, lonely has no label; orphan has no image
    found = {(p.level, p.kind, p.file) for p in report.problems if p.kind != "labels"}
    assert found == {
        ("error", "unpaired-image", "images/lonely.nii.gz"),
        ("error", "unpaired-label", "labels/orphan.nii.gz"),
        ("error", "unreadable", "images/unreadable.nii.gz"),
        ("error", "shape-mismatch", "labels/shape.nii.gz"),
        ("error", "grid-mismatch", "labels/grid.nii.gz"),
        ("error", "label-values", "labels/fractional.nii.gz"),
        ("error", "label-values", "labels/negative.nii.gz"),
        ("error", "non-finite", "labels/nan_label.nii.gz"),
        ("error", "non-finite", "images/nan_image.nii.gz"),
        ("error", "dicom-series", "images/two_series"),
        ("warning", "empty-label", "labels/empty.nii.gz"),
        ("info", "ignored", "images/notes.txt"),
    }
    by_file = {p.file: p for p in report.problems if p.kind != "labels"}
    assert "label (24, 20, 5), images/shape.nii.gz (24, 20, 6)" in by_file["labels/shape.nii.gz"].detail
    assert by_file["labels/grid.nii.gz"].detail.startswith("images/grid.nii.gz then label: origins")
    assert "1 of" in by_file["labels/fractional.nii.gz"].detail
    negative = by_file["labels/negative.nii.gz"]
    assert "negative" in negative.message and negative.detail == "values {-1}"
    assert "1 of" in by_file["images/nan_image.nii.gz"].detail
    series = by_file["images/two_series"]
    assert "--series UID" in series.message and all(uid in series.detail for uid in UIDS)
    assert "second CT" in series.detail
    assert by_file["images/unreadable.nii.gz"].message.startswith("cannot read volume: ")
    assert all("\n" not in p.message and str(broken) not in p.message for p in report.problems)
    # the clean pair and the readable halves of broken ones still report their label values
    assert {p.file for p in report.infos if p.kind == "labels"} >= {"labels/clean.nii.gz", "labels/grid.nii.gz"}


def test_series_picks_one_of_several_and_num_classes_bounds_the_labels(broken, tmp_path):
    report = check_volumes(broken, series=UIDS[1], workers=1)
    assert "images/two_series" not in {p.file for p in report.errors}
    assert "labels/two_series.nii.gz" in {p.file for p in report.infos}
    two_classes = check_volumes(broken, num_classes=2, workers=1)
    too_high = [p for p in two_classes.errors if p.file == "labels/clean.nii.gz"]
    assert [p.kind for p in too_high] == ["label-values"] and "{2}" in too_high[0].detail
    nothing = tmp_path / "nothing"
    (nothing / "images").mkdir(parents=True)
    (nothing / "labels").mkdir()
    empty = check_volumes(nothing)
    assert [(p.kind, p.file) for p in empty.errors] == [("no-cases", ".")]


def test_cli_checks_a_volume_folder_and_a_2d_folder_as_before(good, broken, phantom):
    result = medseg_inprocess("check-data", str(good))
    assert result.returncode == 0, result.stderr
    assert "5 volume pairs, 28 slices" in result.stdout and "anisotropy 1.9-3.1" in result.stdout
    assert "spacing 0.8 x 0.8 x 1.5-2.5 mm" in result.stdout
    assert "0 error(s), 0 warning(s), 5 info" in result.stdout
    result = medseg_inprocess("check-data", str(broken))
    assert result.returncode == 1
    assert "images/two_series" in result.stdout and "labels/grid.nii.gz" in result.stdout
    result = medseg_inprocess("check-data", str(broken), "--series", UIDS[0])
    assert "dicom-series" not in result.stdout
    result = medseg_inprocess("check-data", str(good), "--mask-threshold", "127")
    assert result.returncode != 0 and "--mask-threshold is for 2D masks" in result.error_line()
    assert not is_volume_folder(phantom)
    result = medseg_inprocess("check-data", str(phantom))
    assert result.returncode == 0 and "(folder layout)" in result.stdout and "volume" not in result.stdout
    refused_series = medseg_inprocess("check-data", str(phantom), "--series", UIDS[0])
    assert refused_series.returncode != 0 and "--series is for folders of volumes" in refused_series.error_line()
