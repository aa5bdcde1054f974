"""Reliability catalogue, training and evaluation: every refusal is one line (exit 2, no traceback), inputs are
byte-identical afterwards, and nothing half-written is left: a train refused for anything that can be checked
leaves no run folder; damaged run files are named; resume and evaluate defaults do the expected thing."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, leftovers, medseg_inprocess, refused, snapshot

TINY_SET = [item for pair in (("--set", value) for value in TINY) for item in pair]


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", "unet", "--data", str(data), "--out", str(out), *TINY_SET, *extra]


@pytest.fixture
def data(phantom: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(phantom, copy)
    return copy


@pytest.fixture
def run_copy(tiny_run, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / tiny_run.path.name
    shutil.copytree(tiny_run.path, copy, ignore=shutil.ignore_patterns("eval"))  # other tests' evaluations
    return copy


# --- a train refused before its run folder exists ---------------------------------------------------------

REFUSED_BEFORE_THE_RUN_FOLDER = {
    "size not a multiple": (["--set", "data.size=72"], "multiples of 16"),
    "multi-scale size not a multiple": (["--set", "data.multiscale=[64,70]"], "multiples of 16"),
    "unknown augmentation": (["--set", "data.augment=[hflip,warp]"], "unknown augmentation 'warp'"),
    "augmentation option": (["--set", "data.augment=[{name: rotate, angle: 3}]"], "augmentation 'rotate'"),
    "rot90 on a rectangle": (["--set", "data.size=[64,128]", "--set", "data.augment=[rot90]"], "square"),
    "empty validation split": (["--set", "data.split.val=0"], "validation split is empty"),
    "normalisation std of zero": (["--set", "data.normalize={mean: [0.5, 0.5, 0.5], std: [0.2, 0, 0.2]}"],
                                  "data.normalize: std [0.2, 0.0, 0.2] must be positive"),
    "normalisation mean NaN": (["--set", "data.normalize={mean: [.nan, 0.5, 0.5], std: [0.2, 0.2, 0.2]}"],
                               "data.normalize: mean [nan, 0.5, 0.5] must be a non-empty list of finite numbers"),
    "devices share below a batch": (["--devices", "2", "--set", "train.batch_size=16"], "fewer than one batch"),
    "name with a separator": (["--name", "a/b"], "plain folder name"),
    "name escaping --out": (["--name", "../escaped"], "plain folder name"),
    "hidden name": (["--name", ".hidden"], "plain folder name"),
    "unknown optimiser group": (["--set", "optim.group_lr={nothing: 0.1}"], "unknown groups"),
    "warm-up past the end": (["--set", "schedule.name=warmup_linear", "--set", "schedule.warmup_epochs=9"],
                             "warmup_epochs"),
    "unknown freeze group": (["--set", "train.freeze={groups: [nothing], epochs: 1}"], "nothing"),
    "unknown setting": (["--set", "train.epoch=3"], "epoch"),
    "zero epochs": (["--set", "train.epochs=0"], "epochs"),
    "unknown loss": (["--set", "loss=[{name: focal2}]"], "focal2"),
    "unknown model": (["--set", "model.name=unet9"], "unet9"),
    "unknown logger": (["--set", "train.loggers=[wandb]"], "wandb"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BEFORE_THE_RUN_FOLDER))
def test_a_refused_train_leaves_no_run_folder(case, data, tmp_path):
    extra, fragment = REFUSED_BEFORE_THE_RUN_FOLDER[case]
    before, out = snapshot(data), tmp_path / "runs"
    result = medseg_inprocess(*train_args(data, out, *extra))
    refused(result, fragment)
    assert snapshot(data) == before
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    assert not (tmp_path / "escaped").exists()


def test_out_that_is_a_file_is_refused(data, tmp_path):
    out = tmp_path / "runs"
    out.write_text("not a folder")
    refused(medseg_inprocess(*train_args(data, out)), "is a file")
    assert out.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_in_a_read_only_folder_is_refused(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(medseg_inprocess(*train_args(data, locked / "runs")), "not writable")
    finally:
        locked.chmod(0o700)


def test_missing_data_folder(tmp_path):
    refused(medseg_inprocess(*train_args(tmp_path / "nowhere", tmp_path / "runs")), "nowhere")
    assert not (tmp_path / "runs").exists()


# --- recipes -----------------------------------------------------------------------------------------------

def test_a_folder_given_as_recipe_is_named_a_folder(data, tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    result = medseg_inprocess("train", "--recipe", str(folder), "--data", str(data), "--out", str(tmp_path / "r"))
    refused(result, "is a folder")


@pytest.mark.parametrize("content, fragment", [
    (b"\xff\xfe\x00binary", "cannot be read as text"),
    (b"model: [unclosed", "invalid YAML"),
    (b"- just\n- a list\n", "mapping"),
    (b"model: !!python/object:os.system {}\n", "invalid YAML"),
], ids=["binary", "broken YAML", "a list", "python tag"])
def test_a_bad_recipe_file_is_one_line(content, fragment, data, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_bytes(content)
    result = medseg_inprocess("train", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"))
    refused(result, fragment)
    assert recipe.read_bytes() == content and not (tmp_path / "r").exists()


# --- damaged run folders --------------------------------------------------------------------------------

def resume_args(run: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--recipe", "unet", "--data", str(data), "--out", str(run.parent), "--name", run.name,
            "--resume", *extra]


class Pickled:
    """Anything a weights-only loader refuses: a checkpoint must not run code."""


DAMAGE = {
    "config python tag": ("config.yaml", b"run: !!python/object/apply:os.system [echo]\n", "not a readable run config"),
    "config not a mapping": ("config.yaml", b"- a\n- b\n", "no `run:` section"),
    "config binary": ("config.yaml", b"\xff\xfe\x00", "not a readable run config"),
    "splits not JSON": ("splits.json", b"{train: [", "damaged"),
    "splits without val": ("splits.json", b'{"train": [], "test": []}', "damaged"),
    "checkpoint truncated": ("checkpoints/last.ckpt", None, "cannot be read"),
    "checkpoint not a checkpoint": ("checkpoints/last.ckpt", b"hello", "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_resuming_a_damaged_run_is_one_line(case, run_copy, tiny_run):
    name, content, fragment = DAMAGE[case]
    target = run_copy / name
    if content is None:
        content = target.read_bytes()[:1000]
    target.write_bytes(content)
    before = snapshot(run_copy)
    result = medseg_inprocess(*resume_args(run_copy, tiny_run.data_root()))
    refused(result, fragment)
    assert snapshot(run_copy) == before and not leftovers(run_copy)


def test_a_checkpoint_with_a_pickled_object_is_refused(run_copy, tiny_run):
    torch.save({"epoch": 1, "payload": Pickled()}, run_copy / "checkpoints" / "last.ckpt")
    before = snapshot(run_copy)
    refused(medseg_inprocess(*resume_args(run_copy, tiny_run.data_root())), "cannot be read")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("case", ["config python tag", "config not a mapping", "splits not JSON"])
def test_evaluating_a_damaged_run_is_one_line(case, run_copy, tiny_run):
    name, content, fragment = DAMAGE[case]
    (run_copy / name).write_bytes(content)
    before = snapshot(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy), "--data", str(tiny_run.data_root())), fragment)
    assert snapshot(run_copy) == before


def test_nothing_to_resume(data, tmp_path):
    refused(medseg_inprocess(*train_args(data, tmp_path / "runs", "--resume")), "nothing to resume")


def test_resume_with_other_data_is_refused(run_copy, data):
    refused(medseg_inprocess(*resume_args(run_copy, data)), "resume with the same --data")


# --- resume choices -----------------------------------------------------------------------------------------

def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as stream:
        return list(csv.DictReader(stream))


def test_a_run_stopped_before_its_first_checkpoint_is_named_and_resume_starts_it_again(data, tmp_path):
    out = tmp_path / "runs"
    first = medseg_inprocess(*train_args(data, out, "--name", "r", "--set", "optim.lr=1e30"))
    refused(first, "training loss became")
    assert (out / "r" / "config.yaml").is_file() and not (out / "r" / "checkpoints" / "last.ckpt").exists()
    again = medseg_inprocess(*train_args(data, out, "--name", "r"))
    refused(again, "stopped before its first checkpoint", "--resume")
    resumed = medseg_inprocess(*train_args(data, out, "--name", "r", "--resume", "--set", "optim.lr=3e-4"))
    assert resumed.returncode == 0, resumed.stderr
    assert "training it again from its first epoch" in resumed.stdout
    assert [row["epoch"] for row in metrics(out / "r")] == ["0", "1"]
    assert (out / "r" / "model" / "model.safetensors").is_file()


def test_resume_takes_the_latest_run_with_a_checkpoint_not_a_newer_one_without(run_copy, tiny_run):
    newer = run_copy.parent / f"{run_copy.name}-2"
    newer.mkdir()
    shutil.copy(run_copy / "config.yaml", newer / "config.yaml")
    shutil.copy(run_copy / "splits.json", newer / "splits.json")
    result = medseg_inprocess("train", "--recipe", "unet", "--data", str(tiny_run.data_root()), "--out",
                              str(run_copy.parent), "--resume", "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    assert f"resuming {run_copy}" in result.stdout.replace("\n", "")
    assert [row["epoch"] for row in metrics(run_copy)] == ["0", "1", "2"]
    assert not (newer / "model").exists()


def test_extending_a_finished_run_replans_its_cosine_schedule(run_copy, tiny_run):
    result = medseg_inprocess(*resume_args(run_copy, tiny_run.data_root(), "--set", "train.epochs=4"))
    assert result.returncode == 0, result.stderr
    assert "train.epochs 2 -> 4: the cosine schedule is re-planned for 4 epochs" in " ".join(result.stdout.split())
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    lr, floor = config["optim"]["lr"], config["schedule"]["min_lr"]
    rows = metrics(run_copy)
    assert [row["epoch"] for row in rows] == ["0", "1", "2", "3"]
    for row in rows[2:]:  # what a 4-epoch run uses in epochs 2 and 3, not the old schedule's floor
        epoch = int(row["epoch"])
        assert float(row["lr"]) == pytest.approx(floor + (lr - floor) * (1 + math.cos(math.pi * epoch / 4)) / 2)
    assert float(rows[2]["lr"]) > 10 * floor


def test_a_nan_loss_stops_training_in_one_line(data, tmp_path):
    out = tmp_path / "runs"
    result = medseg_inprocess(*train_args(data, out, "--set", "optim.lr=1e30"))
    line = refused(result, "training loss became", "lower optim.lr")
    assert "nan" in line or "inf" in line
    run = next(out.iterdir())
    assert not (run / "model").exists()  # no model of NaN weights


# --- evaluate ----------------------------------------------------------------------------------------------

def test_evaluate_defaults_to_the_data_the_run_was_trained_on(run_copy, tiny_run):
    result = medseg_inprocess("evaluate", str(run_copy), "--overlays", "0")
    assert result.returncode == 0, result.stderr
    assert (run_copy / "eval" / tiny_run.data_root().name / "summary.json").is_file()


def test_evaluate_names_a_missing_data_folder(run_copy, tmp_path):
    refused(medseg_inprocess("evaluate", str(run_copy), "--data", str(tmp_path / "gone")), "does not exist")
    assert not (run_copy / "eval").exists()


def test_a_killed_evaluations_temporary_is_cleaned_by_the_next(run_copy, tiny_run):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = tiny_run.data_root().name
    stale = run_copy / "eval" / f".{name}.{dead.stdout.strip()}-0123456789ab.tmp"
    (stale / "overlays").mkdir(parents=True)
    live = run_copy / "eval" / f".{name}.{os.getpid()}-0123456789ab.tmp"
    live.mkdir()
    result = medseg_inprocess("evaluate", str(run_copy), "--overlays", "0")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.exists()  # a writer still running keeps its temporary
    live.rmdir()
    assert not leftovers(run_copy)


def test_the_report_lists_the_worst_cases_first_even_when_all_fit():
    from medseg.engine.score import overlay_cases as _overlay_cases

    assert _overlay_cases(["a", "b", "c"], [0.9, 0.1, 0.5], 8) == ["b", "c", "a"]
    assert _overlay_cases(["a", "b", "c"], [0.9, float("nan"), 0.5], -1) == ["b", "c", "a"]
    assert _overlay_cases(["a", "b", "c", "d"], [0.9, 0.1, 0.5, 0.7], 2) == ["b", "a"]


def test_cached_files_get_the_usual_permissions(tmp_path):
    import numpy as np

    from medseg.data.cache import _save_atomic

    previous = os.umask(0o022)
    try:
        _save_atomic(tmp_path / "x.npy", np.zeros(3))
    finally:
        os.umask(previous)
    assert (tmp_path / "x.npy").stat().st_mode & 0o777 == 0o644
