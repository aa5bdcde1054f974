"""Multi-class volumes end to end (issue 17): phantom volumes with an organ (label 1) holding a lesion (label 2) ->
`make_slices(keep_labels=True)` -> a 3-class U-Net trained a few epochs -> `predict` a NIfTI volume (labels in
{0, 1, 2}, each overlapping its reference) and a DICOM series of the same phantom with `--dicom-seg` (one segment
per class present, each with that class's voxels) -> `evaluate --data VOLUMES` (one row per label per volume)."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import TINY, medseg_inprocess
from dicom_series import write_series
from medseg.config import load_recipe
from medseg.data.volume_check import check_volumes
from medseg.data.volume_io import read_volume
from medseg.data.volumes import make_slices
from medseg.engine.train import train

SHAPE = (32, 32, 8)
SPACING = (0.8, 0.8, 2.5)
WINDOW = (0.0, 500.0)
# LPS origin (0, 0, 0), identity direction: the NIfTI (RAS) affine of the same grid flips x and y
NIFTI_AFFINE = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
SERIES_UID = "1.2.826.0.1.3680043.2.1125.17.3"


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(HU image, labels): noise, an ellipsoidal organ (1, ~ +200 HU) and inside it a lesion (2, ~ +300 HU more),
    large enough in every slice it crosses to be learnt in a few epochs."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    cx, cy, cz = rng.uniform(13, 19), rng.uniform(13, 19), rng.uniform(3, 5)
    organ = ((x - cx) / 11) ** 2 + ((y - cy) / 9) ** 2 + ((z - cz) / 3.5) ** 2 <= 1
    lesion = organ & (((x - cx - 2) / 5) ** 2 + ((y - cy) / 4.5) ** 2 + ((z - cz) / 2) ** 2 <= 1)
    labels = organ.astype(np.uint8) + lesion.astype(np.uint8)
    image = rng.normal(50, 15, SHAPE) + 200 * organ + 200 * lesion
    return (2 * np.round(image / 2)).astype(np.int16), labels  # even HU: exact through the series' slope of 2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 2 * np.count_nonzero(a & b) / total if total else 1.0


@pytest.fixture(scope="module")
def multiclass(tmp_path_factory) -> tuple[Path, Path]:
    """(run, volume folder): a 3-class U-Net trained on the single slices (labels kept) of six phantom volumes."""
    root = tmp_path_factory.mktemp("multiclass")
    (root / "volumes" / "images").mkdir(parents=True)
    (root / "volumes" / "labels").mkdir()
    for i in range(6):
        image, labels = _phantom(i)
        nib.save(nib.Nifti1Image(image, NIFTI_AFFINE), root / "volumes" / "images" / f"vol{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, NIFTI_AFFINE), root / "volumes" / "labels" / f"vol{i}.nii.gz")
    slices = make_slices(root / "volumes", root / "slices", window=WINDOW, mode="single", keep_labels=True)
    assert slices["slices"] == 6 * SHAPE[2]
    # a multi-class recipe: softmax cross-entropy for the binary recipe's BCE (the Dice term is multi-class already)
    recipe = load_recipe("unet", [*TINY, "model.in_channels=1", "model.num_classes=3", "loss.0.name=ce",
                                  "model.base_channels=8", "data.size=32", "train.epochs=6", "optim.lr=0.02"])
    run = train(recipe, root / "slices", out=root / "runs", progress=False)
    return run.path, root / "volumes"


def test_the_volume_folder_checks_clean_with_three_classes(multiclass):
    _, volumes = multiclass
    report = check_volumes(volumes, num_classes=3)
    assert report.ok and report.stats["label_values"] == [0, 1, 2] and report.stats["slices"] == 6 * SHAPE[2]


def test_a_nifti_volume_predicts_each_class_on_its_reference(multiclass, tmp_path):
    run, volumes = multiclass
    result = medseg_inprocess("predict", str(run), str(volumes / "images" / "vol0.nii.gz"), "--out",
                              str(tmp_path / "pred"), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    predicted = np.asarray(nib.load(tmp_path / "pred" / "vol0.nii.gz").dataobj)
    reference = np.asarray(nib.load(volumes / "labels" / "vol0.nii.gz").dataobj)
    assert predicted.shape == SHAPE and set(np.unique(predicted).tolist()) == {0, 1, 2}
    organ, lesion = _dice(predicted == 1, reference == 1), _dice(predicted == 2, reference == 2)
    assert organ > 0.6 and lesion > 0.5, (organ, lesion)


def test_a_dicom_series_gives_one_seg_segment_per_class_with_its_voxels(multiclass, tmp_path):
    import highdicom as hd
    import pydicom

    run, volumes = multiclass
    image, reference = _phantom(0)
    names = [f"IM{(3 * k) % SHAPE[2]:03d}.dcm" for k in range(SHAPE[2])]  # file names out of slice order
    write_series(tmp_path / "ct", image, SERIES_UID, "phantom CT", spacing=SPACING, origin=(0.0, 0.0, 0.0),
                 direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), names=names)
    assert np.array_equal(read_volume(tmp_path / "ct").array, image)  # the same voxels as the NIfTI phantom
    result = medseg_inprocess("predict", str(run), str(tmp_path / "ct"), "--out", str(tmp_path / "pred"),
                              "--dicom-seg", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    labels = read_volume(tmp_path / "pred" / "ct.nii.gz").array
    from_nifti = medseg_inprocess("predict", str(run), str(volumes / "images" / "vol0.nii.gz"), "--out",
                                  str(tmp_path / "nifti"), "--device", "cpu")
    assert from_nifti.returncode == 0, from_nifti.stderr
    assert np.array_equal(labels, np.asarray(nib.load(tmp_path / "nifti" / "vol0.nii.gz").dataobj))

    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(tmp_path / "pred" / "ct.seg.dcm"))
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert present == [1, 2]
    assert [s.SegmentNumber for s in seg.SegmentSequence] == [1, 2]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["class 1", "class 2"]
    headers = sorted((pydicom.dcmread(f, stop_before_pixels=True) for f in (tmp_path / "ct").iterdir()),
                     key=lambda h: int(h.InstanceNumber))
    pixels = seg.get_pixels_by_source_instance([h.SOPInstanceUID for h in headers],
                                               assert_missing_frames_are_empty=True)
    assert pixels.shape == (SHAPE[2], SHAPE[1], SHAPE[0], 2)
    for number, value in enumerate(present):
        assert np.array_equal(pixels[..., number] > 0, (labels == value).transpose(2, 1, 0)), value
    assert _dice(labels == 2, reference == 2) > 0.5


def test_evaluate_on_volumes_gives_one_row_per_label(multiclass):
    run, volumes = multiclass
    result = medseg_inprocess("evaluate", str(run), "--data", str(volumes), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    folder = run / "eval" / "volumes-volumes"
    with (folder / "per_volume.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["volume"], r["labels"]) for r in rows] == [(f"vol{i}", label) for i in range(6) for label in "12"]
    for row in rows:
        reference = np.asarray(nib.load(volumes / "labels" / f"{row['volume']}.nii.gz").dataobj)
        assert int(row["reference_voxels"]) == np.count_nonzero(reference == int(row["labels"]))
        assert 0 <= float(row["dice"]) <= 1 and float(row["hd95_mm"]) >= 0
    organ = np.mean([float(r["dice"]) for r in rows if r["labels"] == "1"])
    lesion = np.mean([float(r["dice"]) for r in rows if r["labels"] == "2"])
    assert organ > 0.6 and lesion > 0.5, (organ, lesion)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["labels"]["foregrounds"] == ["1", "2"] and "class k" in summary["labels"]["compared"]
