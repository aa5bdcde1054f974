"""ANU-Net end to end on real Kvasir-SEG images: training lowers the loss, pruned prediction, attention maps,
and the per-level benchmark with Dice and IoU from one run; and on single CT slices of a NIfTI phantom."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from medseg.config import load_recipe
from medseg.data.volumes import make_slices
from medseg.engine.train import train


@pytest.fixture(scope="module")
def anunet_run(kvasir_subset, tmp_path_factory):
    recipe = load_recipe("anunet", ["model.in_channels=3", "data.size=64", "train.epochs=6", "train.batch_size=4",
                                    "data.num_workers=0", "optim.lr=1.0e-3",
                                    "data.split={val: 0.15, test: 0.15, seed: 0}"])
    return train(recipe, kvasir_subset, out=tmp_path_factory.mktemp("runs"), progress=False)


def test_short_training_lowers_the_deeply_supervised_loss(anunet_run):
    with anunet_run.metrics_file.open() as handle:
        losses = [float(row["train_loss"]) for row in csv.DictReader(handle)]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_predict_at_a_pruned_level_writes_masks_and_attention_maps(anunet_run, kvasir_subset, tmp_path):
    image = sorted((kvasir_subset / "images").glob("*.jpg"))[0]
    result = run_cli("predict", str(anunet_run.path), str(image), "--out", str(tmp_path), "--level", "2",
                     "--save-attention")
    assert result.returncode == 0, result.stderr[-2000:]
    width, height = Image.open(image).size
    assert Image.open(tmp_path / f"{image.stem}.png").size == (width, height)
    maps = sorted(tmp_path.glob(f"{image.stem}_attention_*.png"))
    assert [m.name.split("_attention_")[1] for m in maps] == ["x02_from_x00.png", "x02_from_x01.png"]
    assert Image.open(maps[0]).size == (width, height) and Image.open(maps[0]).mode == "RGB"
    bad = run_cli("predict", str(anunet_run.path), str(image), "--out", str(tmp_path), "--level", "5")
    assert bad.returncode == 2 and "level" in bad.stderr


def test_benchmark_levels_of_one_run_with_dice_and_iou(anunet_run, kvasir_subset, tmp_path):
    result = run_cli("benchmark", "--run", str(anunet_run.path), "--levels", "1,2,3,4", "--data", str(kvasir_subset),
                     "--batch", "2", "--warmup", "0", "--repeats", "1", "--json", str(tmp_path / "levels.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "levels.json").read_text())["results"]
    assert [r["model"] for r in rows] == ["anunet L1", "anunet L2", "anunet L3", "anunet L4"]
    assert [r["params"] for r in rows] == [103_188, 520_829, 2_245_503, 9_203_741]
    assert all(0 <= r["dice"] <= 1 and 0 <= r["iou"] <= 1 and r["cases"] == 2 for r in rows)
    assert rows[0]["gflops"] < rows[-1]["gflops"]
    for level in (1, 4):
        assert (anunet_run.path / "eval" / f"kvasir16-L{level}" / "summary.json").is_file()


def test_random_init_benchmark_by_levels_and_bad_levels():
    result = run_cli("benchmark", "--models", "anunet", "--levels", "1,4", "--size", "32", "--batch", "1",
                     "--warmup", "0", "--repeats", "1", "--markdown")
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("| anunet L1 | 3x32x32 | 103,188 |" in result.stdout
            and "| anunet L4 | 3x32x32 | 9,203,741 |" in result.stdout)
    bad = run_cli("benchmark", "--models", "unet", "--levels", "2", "--size", "32")
    assert bad.returncode == 2 and "no pruning levels" in bad.stderr


def test_trains_on_single_ct_slices_from_volumes(tmp_path):
    """The paper's input (Sec. 4.1): single CT slices windowed to [-200, 200] HU, one gray channel."""
    root = tmp_path / "volumes"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    x, y = np.mgrid[:64, :64]
    for case in range(2):
        image = np.full((64, 64, 6), -1000, np.int16)  # air
        labels = np.zeros((64, 64, 6), np.uint8)
        for k in range(6):
            body = (x - 32) ** 2 + (y - 32) ** 2 < 28**2
            liver = (x - 26 - 2 * case) ** 2 + (y - 30) ** 2 < (8 + k) ** 2
            image[:, :, k][body] = 40
            image[:, :, k][liver] = 120
            labels[:, :, k][liver] = 1
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / f"case{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labels" / f"case{case}.nii.gz")
    record = make_slices(root, tmp_path / "slices", window=(-200, 200), mode="single")
    assert record["slices"] == 12
    png = Image.open(tmp_path / "slices" / "images" / "case1_0003.png")
    assert png.mode == "L" and set(np.unique(np.array(png))) == {0, round(240 / 400 * 255), round(320 / 400 * 255)}

    recipe = load_recipe("anunet", ["data.size=64", "train.epochs=1", "train.batch_size=4", "data.num_workers=0",
                                    "data.split={val: 0.2, test: 0.0, seed: 0}"])
    assert recipe.model.in_channels == 1  # the recipe's default: the slice itself, no luma of a stack
    run = train(recipe, tmp_path / "slices", out=tmp_path / "runs", progress=False)
    assert (run.model_dir / "model.safetensors").is_file()
    assert json.loads((run.model_dir / "config.json").read_text())["in_channels"] == 1
