"""`medseg evaluate RUN --data VOLUMES`: a tiny run trained on slices of phantom volumes is scored per volume;
Dice and HD95 in mm equal values computed here independently (predict_volume's labels, numpy and scipy),
`--labels` changes the reference as merging says, `--per-slice` writes per_slice.csv, and a 2D folder evaluates
as before."""

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import TINY, medseg_inprocess, refused
from medseg.data.volume_io import read_volume
from medseg.data.volumes import is_volume_folder, make_slices
from medseg.engine.evaluate import evaluate
from medseg.engine.inference import build_plan
from medseg.engine.volume_predict import predict_volume, slicing_of
from medseg.errors import MedsegError
from test_volume_metrics import scipy_surface_distances

SPACING = (0.8, 0.8, 2.5)
SHAPE = (32, 32, 8)


def _phantom_volumes(root: Path, count: int = 6) -> Path:
    """Image volumes of noise with a bright ellipsoidal organ (label 1) holding a brighter tumour (label 2),
    on an anisotropic grid (NIfTI affine diag(SPACING))."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    affine = np.diag([*SPACING, 1.0])
    for i in range(count):
        cx, cy, cz = rng.uniform(11, 21), rng.uniform(11, 21), rng.uniform(3, 5)
        organ = ((x - cx) / 8) ** 2 + ((y - cy) / 6) ** 2 + ((z - cz) / 2.5) ** 2 <= 1
        tumour = ((x - cx) / 3) ** 2 + ((y - cy) / 3) ** 2 + ((z - cz) / 1.2) ** 2 <= 1
        labels = organ.astype(np.uint8) + (organ & tumour).astype(np.uint8)
        image = rng.normal(60, 20, SHAPE) + 220 * organ + 100 * tumour
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / "images" / f"vol{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), root / "labels" / f"vol{i}.nii.gz")
    return root


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """(volume folder, run) of a U-Net trained briefly on single slices of the phantom volumes."""
    from medseg.config import load_recipe
    from medseg.engine.train import train

    tmp = tmp_path_factory.mktemp("volume-eval")
    volumes = _phantom_volumes(tmp / "volumes")
    slices = Path(make_slices(volumes, tmp / "slices", window=(0, 500), mode="single")["out"])
    # lr and batch so that three epochs find the organ (val Dice ~0.95) rather than call everything foreground
    recipe = load_recipe("unet", [*TINY, "model.in_channels=1", "data.size=32", "train.epochs=3",
                                   "optim.lr=0.01", "train.batch_size=2"])
    return volumes, train(recipe, slices, out=tmp / "runs", progress=False)


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _predicted(run, image_path: Path) -> np.ndarray:
    plan = build_plan([run.path], "cpu")
    return predict_volume(plan, read_volume(image_path), slicing_of(plan.reference.config),
                          threshold=plan.reference.threshold or 0.5).labels


def test_per_volume_metrics_equal_an_independent_computation(volume_run):
    volumes, run = volume_run
    assert is_volume_folder(volumes) and not is_volume_folder(run.data_root())
    result = medseg_inprocess("evaluate", str(run.path), "--data", str(volumes), "--per-slice", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    folder = run.eval_dir("volumes-volumes")
    assert "hd95_mm" in result.stdout and str(folder / "report.md") in result.stdout
    rows = _rows(folder / "per_volume.csv")
    assert [r["volume"] for r in rows] == [f"vol{i}" for i in range(6)] and {r["labels"] for r in rows} == {">0"}
    dice = []
    for row in rows:
        image_path = volumes / "images" / f"{row['volume']}.nii.gz"
        predicted = _predicted(run, image_path) > 0
        truth = np.asarray(nib.load(volumes / "labels" / f"{row['volume']}.nii.gz").dataobj) > 0
        both = np.count_nonzero(predicted & truth)
        assert float(row["dice"]) == pytest.approx(2 * both / (predicted.sum() + truth.sum()), abs=1e-6)
        assert int(row["reference_voxels"]) == truth.sum() and int(row["predicted_voxels"]) == predicted.sum()
        if predicted.any():
            hd95, assd = scipy_surface_distances(predicted, truth, SPACING)
        else:  # one side empty: the volume's diagonal in mm
            hd95 = assd = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))
        assert float(row["hd95_mm"]) == pytest.approx(hd95, rel=1e-5)
        assert float(row["assd_mm"]) == pytest.approx(assd, rel=1e-5)
        dice.append(float(row["dice"]))
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["dice"]["value"] == pytest.approx(np.mean(dice), abs=1e-5)
    assert summary["metrics"]["dice"]["median"] == pytest.approx(sorted(dice)[2], abs=1e-5)  # torch's lower median
    assert summary["protocol"]["units"]["hd95_mm"] == "mm" and summary["cases"] == 6
    assert summary["spacing"]["xyz_mm"] == [list(SPACING)] and "header" in summary["spacing"]["source"]
    assert summary["slicing"]["mode"] == "single" and summary["slicing"]["window"] == [0.0, 500.0]
    assert summary["model"]["name"] == "unet" and summary["labels"]["merged"] is None
    assert "both_empty" in summary["protocol"]["empty_rules"]
    per_slice = _rows(folder / "per_slice.csv")
    assert per_slice and all(0 <= float(r["dice"]) <= 1 for r in per_slice)
    assert {r["volume"] for r in per_slice} == {f"vol{i}" for i in range(6)}
    report = (folder / "report.md").read_text()
    assert "worst and best by Dice" in report and "hd95_mm" in report and "per_slice.csv" in report


def test_labels_merging_changes_the_reference(volume_run):
    volumes, run = volume_run
    default = {r["volume"]: r for r in _rows(evaluate(run.path, volumes, device="cpu") / "per_volume.csv")}
    tumour = evaluate(run.path, volumes, device="cpu", labels="2")
    assert tumour.name == "volumes-volumes-labels2"
    merged = evaluate(run.path, volumes, device="cpu", labels="2,1")
    for row in _rows(tumour / "per_volume.csv"):
        truth = np.asarray(nib.load(volumes / "labels" / f"{row['volume']}.nii.gz").dataobj)
        assert row["labels"] == "2" and int(row["reference_voxels"]) == np.count_nonzero(truth == 2)
        assert row["predicted_voxels"] == default[row["volume"]]["predicted_voxels"]  # the prediction is unchanged
    for row in _rows(merged / "per_volume.csv"):  # 1 and 2 merged: every label > 0, the default's numbers
        assert row["labels"] == "1+2"
        assert {k: row[k] for k in ("dice", "hd95_mm", "reference_voxels")} == \
            {k: default[row["volume"]][k] for k in ("dice", "hd95_mm", "reference_voxels")}
    assert json.loads((merged / "summary.json").read_text())["labels"]["merged"] == [1, 2]
    refused(medseg_inprocess("evaluate", str(run.path), "--data", str(volumes), "--labels", "0,x"),
            "--labels takes label values > 0", "'0,x'")


def test_volume_only_and_2d_only_options_are_refused_in_one_line(volume_run):
    volumes, run = volume_run
    with pytest.raises(MedsegError, match="--spacing applies to 2D data folders"):
        evaluate(run.path, volumes, device="cpu", spacing="0.5")
    with pytest.raises(MedsegError, match="--labels and --per-slice apply to a folder of volume pairs"):
        evaluate(run.path, run.data_root(), device="cpu", per_slice=True)


def test_a_2d_folder_still_evaluates_as_before(volume_run):
    _, run = volume_run
    folder = evaluate(run.path, device="cpu", overlays=0)  # the slices it was trained on: its test split
    assert (folder / "per_case.csv").is_file() and not (folder / "per_volume.csv").exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["split"] == "test" and summary["protocol"]["name"] != "volume" and "dice" in summary["metrics"]


def test_a_label_on_another_grid_is_refused(volume_run, tmp_path):
    volumes, run = volume_run
    moved = _phantom_volumes(tmp_path / "moved", count=1)
    label = nib.load(moved / "labels" / "vol0.nii.gz")
    shifted = label.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), moved / "labels" / "vol0.nii.gz")
    with pytest.raises(MedsegError, match="lie on different voxel grids"):
        evaluate(run.path, moved, device="cpu")
