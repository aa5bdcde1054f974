"""FocusNet end to end on real data: short trainings on gray ISBI 2012 EM and RGB Kvasir-SEG lower the
Dice loss, the training split's z-score statistics are stored in the run and used by predict, and
evaluation reports the paper's DI, JI, AC, SE, SP."""

import csv
import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli
from medseg.config import load_recipe
from medseg.data.dataset import intensity_statistics, load_image_tensor
from medseg.data.formats import discover
from medseg.data.splits import cases_for
from medseg.engine.inference import Predictor
from medseg.engine.train import preprocessing_of, train

SHORT = ["data.size=64", "train.epochs=3", "train.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def isbi(shared_data):
    folder = shared_data / "isbi2012_em"
    if not (folder / "images").is_dir():
        pytest.fail(f"{folder} lacks images/; see {shared_data / 'README.md'}")
    return folder


def losses(run):
    with run.metrics_file.open() as handle:
        return [float(row["train_loss"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("channels", [1, 3])
def test_training_lowers_the_loss_and_stores_the_normalisation(isbi, kvasir_subset, tmp_path, channels):
    data = isbi if channels == 1 else kvasir_subset  # gray EM with a gray network; RGB polyps
    run = train(load_recipe("focusnet", [*SHORT, f"model.in_channels={channels}"]), data, out=tmp_path, progress=False)
    trace = losses(run)
    assert trace[-1] < trace[0], trace
    with run.metrics_file.open() as handle:
        assert {"train_dice", "train_kernel_l2"} <= set(next(csv.reader(handle)))  # the loss and its Keras L2

    stored = yaml.safe_load(run.config_file.read_text())["data"]["normalize"]
    layout = discover(data)
    train_cases = cases_for(layout, json.loads(run.splits_file.read_text())["train"])
    recipe = load_recipe("focusnet", [*SHORT, f"model.in_channels={channels}", "data.normalize=none"])
    mean, std = intensity_statistics(train_cases, preprocessing_of(recipe))
    assert stored == {"mean": [pytest.approx(mean)], "std": [pytest.approx(std)]}
    assert 0.05 < mean < 0.95 and std > 0.01

    predictor = Predictor(run.path, device="cpu", precision="32")  # compared with an fp32 forward below
    assert predictor.preprocessing.normalize == stored
    image = load_image_tensor(train_cases[0], predictor.preprocessing)
    image = predictor.preprocessing.resize(image)[None]
    with torch.no_grad():
        expected = torch.sigmoid(predictor.model((image - mean) / std))
    assert torch.allclose(predictor.probabilities(predictor.preprocessing.normalise(image)), expected, atol=1e-5)


def test_evaluate_reports_the_five_metrics_and_predict_writes_masks(isbi, tmp_path):
    run = train(load_recipe("focusnet", [*SHORT, "model.in_channels=1", "train.epochs=1"]), isbi, out=tmp_path,
                progress=False)
    result = run_cli("evaluate", str(run.path), "--data", str(isbi), "--overlays", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run.path / "eval" / "isbi2012_em" / "summary.json").read_text())["metrics"]
    assert {"dice", "iou", "accuracy", "sensitivity", "specificity"} <= set(metrics)  # DI, JI, AC, SE, SP
    assert all(0 <= metrics[name]["value"] <= 1 for name in ("dice", "iou", "accuracy", "sensitivity", "specificity"))
    image = isbi / "images" / "00.png"
    predicted = run_cli("predict", str(run.path), str(image), "--out", str(tmp_path / "pred"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    mask = Image.open(tmp_path / "pred" / "00.png")
    assert mask.size == (512, 512) and set(mask.getdata()) <= {0, 255}
