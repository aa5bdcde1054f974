"""`medseg tune-threshold`: the grid, the choice, the stored file, and predict / evaluate using it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import medseg_inprocess, refused, run_cli
from medseg.engine.threshold import parse_grid
from medseg.errors import MedsegError
from medseg.models.saving import THRESHOLD_NAME, read_threshold


def test_grid_forms_and_refusals():
    default = parse_grid("0.05..0.95 step 0.05")
    assert len(default) == 19 and default[0] == 0.05 and default[-1] == 0.95 and 0.5 in default
    assert parse_grid("0.5, 0.3,0.4") == [0.3, 0.4, 0.5]
    for bad in ("0..1 step 0.1", "0.1..0.9 step 0", "0.9..0.1 step 0.1", "a,b", "0.5,1.5", ""):
        with pytest.raises(MedsegError, match="--grid"):
            parse_grid(bad)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """The tiny run copied, so the threshold it stores stays out of the shared run."""
    folder = tmp_path / "run"
    shutil.copytree(tiny_run.path, folder)
    return folder


def test_tune_threshold_stores_the_best_of_the_grid_and_predict_uses_it(run_copy, phantom, tmp_path):
    result = run_cli("tune-threshold", str(run_copy), "--grid", "0.1..0.9 step 0.2")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((run_copy / "model" / THRESHOLD_NAME).read_text())
    grid = [row["threshold"] for row in record["grid"]]
    assert grid == [0.1, 0.3, 0.5, 0.7, 0.9] and record["threshold"] in grid
    scores = [row["dice"] for row in record["grid"]]
    best = max(scores)
    assert record["score"] == best
    winners = [t for t, s in zip(grid, scores) if s == best]
    assert record["threshold"] == min(winners, key=lambda t: abs(t - 0.5))  # ties: the closest to 0.5
    splits = json.loads((run_copy / "splits.json").read_text())
    assert record["split"] == "val" and record["cases"] == len(splits["val"])
    assert read_threshold(run_copy / "model") == record["threshold"]
    assert f"threshold {record['threshold']:g}" in result.stdout
    assert "tune-threshold: " in result.stderr  # progress lines: stderr is not a terminal here

    image = phantom / "images" / sorted(p.name for p in (phantom / "images").iterdir())[0]
    tuned = run_cli("predict", str(run_copy), str(image), "--out", str(tmp_path / "tuned"), "--probabilities")
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    settings = json.loads((tmp_path / "tuned" / "predict.json").read_text())["settings"]
    assert settings["threshold"] == record["threshold"] and settings["threshold_source"].startswith("tuned")
    mask = np.asarray(Image.open(tmp_path / "tuned" / f"{image.stem}.png")) > 0
    prob = np.asarray(Image.open(tmp_path / "tuned" / f"{image.stem}_prob.png")) / 255
    certain = np.abs(prob - record["threshold"]) > 1 / 255  # the 8-bit map cannot settle pixels at the threshold
    assert np.array_equal(mask[certain], prob[certain] >= record["threshold"])

    forced = run_cli("predict", str(run_copy), str(image), "--out", str(tmp_path / "forced"), "--threshold", "0.99")
    assert forced.returncode == 0, forced.stderr[-2000:]
    settings = json.loads((tmp_path / "forced" / "predict.json").read_text())["settings"]
    assert settings["threshold"] == 0.99 and settings["threshold_source"] == "--threshold"


def test_evaluate_uses_the_tuned_threshold_for_label_metrics_only(run_copy, phantom):
    from medseg.engine.evaluate import evaluate

    def summary(**options) -> dict:
        return json.loads((evaluate(run_copy, overlays=0, workers=0, protocol="infnet", **options)
                           / "summary.json").read_text())

    (run_copy / "model" / THRESHOLD_NAME).write_text(json.dumps({"threshold": 0.999}))
    tuned, plain = summary(), summary(threshold=0.5)
    assert tuned["decision"]["threshold"] == 0.999 and tuned["decision"]["threshold_source"].startswith("tuned")
    assert plain["decision"]["threshold_source"] == "--threshold"
    assert tuned["metrics"]["sm"] == plain["metrics"]["sm"]  # a map metric: the probabilities, unchanged
    assert tuned["metrics"]["sensitivity"]["value"] <= plain["metrics"]["sensitivity"]["value"]
    assert tuned["metrics"]["dice"] != plain["metrics"]["dice"]


def test_a_damaged_threshold_file_and_bad_options_are_one_line(run_copy):
    (run_copy / "model" / THRESHOLD_NAME).write_text('{"threshold": 1.5}')
    refused(medseg_inprocess("predict", str(run_copy), str(run_copy), "--out", str(run_copy / "p")), THRESHOLD_NAME,
            "tune-threshold")
    refused(medseg_inprocess("tune-threshold", str(run_copy), "--metric", "sensitivity"), "--metric", "dice")
    refused(medseg_inprocess("tune-threshold", str(run_copy), "--grid", "0.2..0.1 step 0.1"), "--grid")


def test_multi_class_networks_are_refused(run_copy):
    from medseg import create_model
    from medseg.models.saving import save_model

    config = json.loads((run_copy / "model" / "config.json").read_text())
    model = create_model(config["name"], config["in_channels"], 3, **config["kwargs"])
    extra = {k: v for k, v in config.items() if k not in ("name", "in_channels", "num_classes", "kwargs", "format")}
    save_model(model, run_copy / "model", {**extra, "num_classes": 3})
    refused(medseg_inprocess("tune-threshold", str(run_copy)), "argmax", "binary")
