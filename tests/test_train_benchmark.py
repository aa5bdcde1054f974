"""`medseg benchmark --train`: the engine and the bare loop train the same network on the same batches."""

import json

import pytest

from conftest import run_cli
from medseg.engine.train_benchmark import benchmark_recipe, benchmark_training


def test_the_recipe_is_the_networks_own_single_scale_with_the_precision():
    recipe = benchmark_recipe("m2snet", 64, 4, "bf16-mixed", 3)
    assert recipe.name == "m2snet" and recipe.data.multiscale is None and recipe.train.batch_size == 4
    assert recipe.train.precision == "bf16-mixed" and [t.name for t in recipe.loss] == ["structure", "lossnet"]
    borrowed = benchmark_recipe("unetpp:deep_supervision=true", 64, 2, "32", 1)
    assert borrowed.model.name == "unetpp" and borrowed.model.options() == {"deep_supervision": True}
    assert borrowed.model.in_channels == 1


def test_engine_and_bare_loop_throughput_are_reported_per_precision(tmp_path, monkeypatch):
    from medseg.engine import train_benchmark

    order = []
    for kind in ("engine_steps", "bare_steps"):
        real = getattr(train_benchmark, kind)
        monkeypatch.setattr(train_benchmark, kind, lambda *a, _real=real, _kind=kind, **k: order.append(_kind)
                            or _real(*a, **k))
    report = benchmark_training(["unet:base_channels=4"], size=32, batch=2, precisions=("32", "bf16-mixed"),
                                warmup=1, steps=2, rounds=3)
    # ABBA: the order alternates round by round, so drift of the machine does not favour one side
    assert order == ["engine_steps", "bare_steps", "bare_steps", "engine_steps", "engine_steps", "bare_steps"] * 2
    assert report["rounds"] == 3
    first, second = report["results"]
    assert (first["precision"], first["memory_format"]) == ("32-true", "contiguous")
    assert (second["precision"], second["memory_format"]) == ("bf16-mixed", "channels_last")
    for result in report["results"]:
        assert result["train_img_s"] > 0 and result["raw_img_s"] > 0
        assert result["ratio"] == pytest.approx(result["train_img_s"] / result["raw_img_s"])
        assert result["train_img_s"] == pytest.approx(2 / result["engine_step_s"])
        assert result["params"] > 0 and result["gflops"] > 0


def test_the_command_writes_json_with_the_issue_keys(tmp_path):
    out = tmp_path / "train.json"
    result = run_cli("benchmark", "--train", "--models", "unet:base_channels=4", "--size", "32", "--batch", "2",
                     "--steps", "1", "--warmup", "1", "--precisions", "32", "--json", str(out))
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())["results"][0]
    assert {"train_img_s", "raw_img_s", "ratio", "precision", "memory_format", "params", "gflops"} <= set(row)
    refused = run_cli("benchmark", "--train", "--precisions", "fp8")
    assert refused.returncode == 2 and "--precisions: fp8; choose from auto, 32, 16-mixed, bf16-mixed" in refused.stderr


def test_a_data_folder_feeds_the_engine_with_the_training_loader_and_the_bare_loop_with_its_batches(phantom):
    report = benchmark_training(["unet:base_channels=4"], size=32, batch=2, precisions=("32",), warmup=1, steps=2,
                                in_channels=1, data=phantom)
    row = report["results"][0]
    assert row["data"] == str(phantom) and row["cache_fill_s"] is not None and row["cache_fill_s"] >= 0
    assert row["train_img_s"] > 0 and row["raw_img_s"] > 0 and row["loader_workers"] >= 0
