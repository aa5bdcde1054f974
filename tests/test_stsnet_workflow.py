"""STS-Net end to end on real Kvasir-SEG images: two-class training with amplification lowers the loss and
evaluation reports the paper's five metrics."""

import csv
import json

from PIL import Image

from conftest import run_cli
from medseg.config import load_recipe
from medseg.engine.train import train


def test_short_training_with_amplification_and_the_five_metrics(kvasir_subset, tmp_path):
    recipe = load_recipe("stsnet", ["data.size=64", "train.epochs=3", "data.num_workers=0", "optim.lr=5.0e-4",
                                    "data.split={val: 0.15, test: 0.15, seed: 0}"])
    run = train(recipe, kvasir_subset, out=tmp_path, progress=False)
    with run.metrics_file.open() as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    plan = json.loads((run.path / "amplify.json").read_text())
    assert plan["training_images"] == len(json.loads(run.splits_file.read_text())["train"])
    assert plan["new_images"] == 5 * plan["qualifying_images"] > 0

    result = run_cli("evaluate", str(run.path), "--data", str(kvasir_subset), "--overlays", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run.path / "eval" / "kvasir16" / "summary.json").read_text())["metrics"]
    # mDice, mIoU, Jaccard, recall, precision
    assert {"mdice", "miou", "iou", "sensitivity", "precision"} <= set(metrics)
    image = sorted((kvasir_subset / "images").glob("*.jpg"))[0]
    predicted = run_cli("predict", str(run.path), str(image), "--out", str(tmp_path / "pred"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    mask = Image.open(tmp_path / "pred" / f"{image.stem}.png")
    assert mask.size == Image.open(image).size and set(mask.getdata()) <= {0, 255}  # two-class output written as 0/255
