"""Reliability catalogue, predict / evaluate / model folders / command-line usage: every refusal is one `error:`
line with exit status 2 and no traceback, the inputs (images, run and model folders) are byte-identical afterwards,
and nothing half-written remains: no hidden temporaries, no outputs of a refused predict, and OUT/predict.json says
whether a predict finished.

Cases by class (the issue's list): silently wrong results (thresholds, normalisation, NaN weights, overlay
counts), output paths, damaged model and run files and devices, mixed inputs to predict, usage errors, and the rest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import leftovers, medseg_inprocess, refused, snapshot

STEM = "phantom_0000"


@pytest.fixture
def run_copy(tiny_run, tmp_path: Path) -> Path:
    """A private copy of the tiny trained run to damage (without the evaluations other tests left in it)."""
    return Path(shutil.copytree(tiny_run.path, tmp_path / "runs" / tiny_run.path.name,
                                ignore=shutil.ignore_patterns("eval")))


@pytest.fixture
def images(phantom: Path, tmp_path: Path) -> Path:
    """Four phantom images in a folder of their own."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((phantom / "images").iterdir())[:4]:
        shutil.copy(path, folder)
    return folder


class Guard:
    """Bytes of every input folder before a command, compared after it, plus the no-leftovers check."""

    def __init__(self, *folders: Path):
        self.folders = [f for f in folders if f.exists()]
        self.before = [snapshot(f) for f in self.folders]

    def check(self, *outputs: Path) -> None:
        for folder, before in zip(self.folders, self.before):
            assert snapshot(folder) == before, f"{folder} changed"
            assert not leftovers(folder), leftovers(folder)
        for out in outputs:
            assert not leftovers(out), leftovers(out)


def predict_refused(run: Path, inputs: list[Path], out: Path, *extra: str, fragments: tuple[str, ...] = ()) -> str:
    """`medseg predict` refused in one line, with nothing written to OUT and every input unchanged."""
    guard = Guard(run, *{p if p.is_dir() else p.parent for p in inputs})
    existed = out.exists()
    listing = sorted(out.iterdir()) if existed and out.is_dir() else None
    line = refused(medseg_inprocess("predict", str(run), *map(str, inputs), "--out", str(out), *extra), *fragments)
    guard.check(out)
    if not existed:
        assert not out.exists() or not out.is_dir() or not any(out.iterdir()), list(out.iterdir())
    elif listing is not None:
        assert sorted(out.iterdir()) == listing
    return line


# --- 1. silently wrong results -------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", ["2", "0", "1", "nan", "-0.5", "inf"])
def test_a_threshold_outside_zero_one_is_refused(threshold, run_copy, images, tmp_path):
    predict_refused(run_copy, [images], tmp_path / "o", "--threshold", threshold,
                    fragments=("--threshold", "strictly between 0 and 1"))


def _edit_config(folder: Path, change) -> dict:
    path = folder / "model" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    return config


@pytest.mark.parametrize("std", [0.0, float("nan"), -1.0, float("inf")], ids=["zero", "nan", "negative", "inf"])
def test_a_stored_normalisation_that_makes_nan_is_refused(std, run_copy, images, tmp_path):
    _edit_config(run_copy, lambda c: c["preprocessing"].update(normalize={"mean": [0.5], "std": [std]}))
    predict_refused(run_copy, [images], tmp_path / "o",
                    fragments=(str(run_copy / "model" / "config.json"), "normalisation std"))


def test_a_stored_normalisation_mean_of_nan_is_refused(run_copy, images, tmp_path):
    _edit_config(run_copy, lambda c: c["preprocessing"].update(normalize={"mean": [float("nan")], "std": [0.2]}))
    predict_refused(run_copy, [images], tmp_path / "o", fragments=("config.json", "mean"))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_weights_with_non_finite_values_are_refused(value, run_copy, images, tmp_path):
    weights = run_copy / "model" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[:3] = value
    save_file(state, weights)
    predict_refused(run_copy, [images], tmp_path / "o", fragments=(str(weights), "3 NaN or Inf value(s)", name))


def test_evaluate_refuses_an_overlay_count_below_minus_one(run_copy):
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy), "--overlays", "-5"), "--overlays")
    guard.check()
    assert not (run_copy / "eval").exists()


def test_evaluate_overlays_minus_one_still_means_all(run_copy, tiny_run):
    from medseg.engine.evaluate import evaluate

    with pytest.raises(Exception, match="--overlays"):
        evaluate(run_copy, overlays=-2)
    folder = evaluate(run_copy, overlays=-1, device="cpu", workers=0)
    cases = json.loads((folder / "summary.json").read_text())["cases"]
    assert len(list((folder / "overlays").glob("*.png"))) == cases


# --- 2. output paths -------------------------------------------------------------------------------------------

def test_predict_out_that_is_a_file(run_copy, images, tmp_path):
    out = tmp_path / "o"
    out.write_text("mine")
    predict_refused(run_copy, [images], out, fragments=("--out", "is a file"))
    assert out.read_text() == "mine"


def test_predict_out_below_a_file(run_copy, images, tmp_path):
    (tmp_path / "f").write_text("mine")
    predict_refused(run_copy, [images], tmp_path / "f" / "o", fragments=("--out", "is a file"))


def test_predict_out_on_a_filesystem_that_cannot_be_written(run_copy, images):
    predict_refused(run_copy, [images], Path("/proc/medseg-out"), fragments=("--out", "not writable"))


def test_predict_out_that_is_a_broken_link(run_copy, images, tmp_path):
    out = tmp_path / "o"
    out.symlink_to(tmp_path / "gone")
    predict_refused(run_copy, [images], out, fragments=("--out", "broken link"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_predict_out_in_a_read_only_folder(run_copy, images, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        predict_refused(run_copy, [images], locked / "o", fragments=("--out", "not writable"))
    finally:
        locked.chmod(0o700)


def test_predict_refuses_to_overwrite_its_inputs(run_copy, images):
    predict_refused(run_copy, [images], images, fragments=("would overwrite the input", STEM))


def test_predict_outputs_of_two_inputs_that_share_a_name(run_copy, images, tmp_path):
    shutil.copy(images / f"{STEM}.png", images / f"{STEM}_overlay.png")
    predict_refused(run_copy, [images], tmp_path / "o", "--overlay", fragments=(f"{STEM}_overlay.png",))


def test_evaluate_when_the_runs_eval_is_a_file(run_copy):
    (run_copy / "eval").write_text("mine")
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy)), "eval", "is a file")
    guard.check()


def test_evaluate_when_its_result_folder_is_a_file(run_copy, tiny_run):
    (run_copy / "eval").mkdir()
    (run_copy / "eval" / tiny_run.data_root().name).write_text("mine")
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy), "--overlays", "0"), "is a file")
    guard.check()


@pytest.mark.parametrize("command", [["benchmark", "--models", "unet", "--size", "32", "--repeats", "1"],
                                     ["benchmark", "fovea-pool", "--repeats", "1"]], ids=["benchmark", "fovea-pool"])
def test_benchmark_json_that_is_a_folder(command, tmp_path):
    refused(medseg_inprocess(*command, "--json", str(tmp_path)), "--json", "is a folder")
    assert not leftovers(tmp_path.parent)


def test_benchmark_json_below_a_file(tmp_path):
    (tmp_path / "f").write_text("mine")
    refused(medseg_inprocess("benchmark", "--models", "unet", "--json", str(tmp_path / "f" / "b.json")), "is a file")


def test_benchmark_json_on_a_filesystem_that_cannot_be_written():
    refused(medseg_inprocess("benchmark", "--models", "unet", "--json", "/proc/medseg.json"), "not writable")


def test_analyze_out_that_is_a_folder(run_copy, tiny_run, tmp_path):
    guard = Guard(run_copy)
    refused(medseg_inprocess("analyze", "cka", str(run_copy), "--data", str(tiny_run.data_root()), "--layer",
                             "encoder.0", "--out", str(tmp_path)), "--out", "is a folder")
    guard.check()


def test_train_uses_the_same_output_folder_check(phantom, tmp_path):
    from conftest import TINY

    settings = [a for v in TINY for a in ("--set", v)]
    result = medseg_inprocess("train", "--recipe", "unet", "--data", str(phantom), "--out", "/proc/medseg-runs",
                              *settings)
    refused(result, "--out", "not writable")


def test_a_full_disk_while_predicting_is_one_line_and_the_manifest_says_incomplete(run_copy, images, tmp_path,
                                                                                   monkeypatch):
    import medseg.engine.predict as predict_module
    from medseg.files import atomic_file

    real, calls = predict_module.write_image_atomic, []

    def full_disk(path, array):
        calls.append(path)
        if len(calls) <= 2:
            return real(path, array)
        with atomic_file(path) as temporary:  # half a file in the temporary, then the disk is full
            temporary.write_bytes(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device", str(temporary))

    monkeypatch.setattr(predict_module, "write_image_atomic", full_disk)
    guard, out = Guard(run_copy, images), tmp_path / "o"
    line = refused(medseg_inprocess("predict", str(run_copy), str(images), "--out", str(out)),
                   "No space left on device", "free disk space")
    assert str(out / calls[2].name) in line  # the output, not its hidden temporary
    guard.check(out)
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] is False and manifest["finished"] is None
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in calls[:2])


def test_a_full_disk_while_evaluating_leaves_no_eval_folder(run_copy, monkeypatch):
    import medseg.engine.score as score_module  # evaluate writes its report through score's writer

    def full_disk(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(score_module, "write_per_case", full_disk)
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy), "--overlays", "0"), "No space left on device")
    guard.check()
    assert not (run_copy / "eval").exists() or not any((run_copy / "eval").iterdir())


# --- 3. damaged model and run files, devices ----------------------------------------------------------------

MODEL_DAMAGE = {
    "weights truncated": ("model.safetensors", "truncate", "truncated or not a safetensors file"),
    "weights empty": ("model.safetensors", b"", "truncated or not a safetensors file"),
    "weights garbage": ("model.safetensors", b"\x00\x01garbage" * 50, "truncated or not a safetensors file"),
    "weights a pickle": ("model.safetensors", "pickle", "truncated or not a safetensors file"),
    "config not JSON": ("config.json", b'{"name": "unet", ', "not valid JSON"),
    "config binary": ("config.json", b"\xff\xfe\x00\x01", "not valid JSON"),
    "config a list": ("config.json", b"[1, 2]", "JSON list"),
    "config without name": ("config.json", {"name": None}, "no network `name`"),
    "config channels a string": ("config.json", {"in_channels": "three"}, "`in_channels`"),
    "config classes zero": ("config.json", {"num_classes": 0}, "`num_classes`"),
    "config kwargs a list": ("config.json", {"kwargs": [4]}, "`kwargs`"),
    "config without preprocessing": ("config.json", {"preprocessing": None}, "`preprocessing`"),
    "config size of zero": ("config.json", {"preprocessing": {"size": [0, 64], "in_channels": 3}}, "size"),
    "config unknown normalisation": ("config.json", {"preprocessing": {"size": [64, 64], "in_channels": 3,
                                                                       "normalize": "zscore"}}, "zscore"),
    "config unknown network": ("config.json", {"name": "unet9"}, "unet9"),
    "config unknown option": ("config.json", {"kwargs": {"depth_x": 3}}, "depth_x"),
    "config of another width": ("config.json", {"kwargs": {"base_channels": 8}}, "does not match network"),
    "config mask threshold a string": ("config.json", {"mask_threshold": "127"}, "mask_threshold"),
    "weights missing": ("model.safetensors", None, "no model.safetensors"),
    "config missing": ("config.json", None, "no config.json"),
}


class Pickled:
    """What a weights-only reader must refuse: a pickle that would build an object."""


def _damage_model(model: Path, name: str, damage) -> None:
    target = model / name
    if damage is None:
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "pickle":
        torch.save({"state_dict": {}, "payload": Pickled()}, target)
    elif isinstance(damage, dict):
        config = json.loads(target.read_text())
        config.update(damage)
        target.write_text(json.dumps(config))
    else:
        target.write_bytes(damage)


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_predict_names_a_damaged_model_folder(case, run_copy, images, tmp_path):
    name, damage, fragment = MODEL_DAMAGE[case]
    _damage_model(run_copy / "model", name, damage)
    line = predict_refused(run_copy, [images], tmp_path / "o", fragments=(fragment,))
    assert str(run_copy / "model") in line


@pytest.mark.parametrize("case", ["weights truncated", "config not JSON", "config without preprocessing"])
def test_evaluate_names_a_damaged_model_folder(case, run_copy):
    name, damage, fragment = MODEL_DAMAGE[case]
    _damage_model(run_copy / "model", name, damage)
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy)), fragment, str(run_copy / "model"))
    guard.check()
    assert not (run_copy / "eval").exists()


def test_a_run_without_a_model_folder(run_copy, images, tmp_path):
    shutil.rmtree(run_copy / "model")
    predict_refused(run_copy, [images], tmp_path / "o", fragments=("no saved model", "medseg train"))


def test_a_model_path_that_does_not_exist(images, tmp_path):
    predict_refused(tmp_path / "nothing", [images], tmp_path / "o", fragments=("does not exist",))


def test_a_model_given_by_its_weights_file(run_copy, images, tmp_path):
    predict_refused(run_copy / "model" / "model.safetensors", [images], tmp_path / "o",
                    fragments=("no saved model",))


@pytest.mark.parametrize("config, fragment", [
    (b"run: !!python/object/apply:os.system [echo]\nmodel: {name: unet}\n", "not a readable run config"),
    (b"model: {name: unet}\nrun: {seed: 0}\n", "does not record the data folder"),
], ids=["python tag", "no data folder"])
def test_evaluate_names_a_damaged_run_config(config, fragment, run_copy):
    (run_copy / "config.yaml").write_bytes(config)
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy)), fragment)
    guard.check()


@pytest.mark.parametrize("device, fragment", [("tpu", "not a device"), ("cpu:x", "not a device"),
                                              ("CUDA", "not a device"),
                                              ("cuda:7", "cuda:7"), ("mps", "mps")])
def test_predict_names_a_device_this_machine_lacks(device, fragment, run_copy, images, tmp_path):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    predict_refused(run_copy, [images], tmp_path / "o", "--device", device, fragments=("--device", fragment))


def test_evaluate_names_a_bad_device(run_copy):
    guard = Guard(run_copy)
    refused(medseg_inprocess("evaluate", str(run_copy), "--device", "tpu"), "--device", "tpu")
    guard.check()


def test_predict_names_a_bad_precision(run_copy, images, tmp_path):
    predict_refused(run_copy, [images], tmp_path / "o", "--precision", "fp8", fragments=("--precision", "fp8"))


# --- 4. mixed inputs ----------------------------------------------------------------------------------------

def _bad_inputs(folder: Path) -> dict[str, Path]:
    """One input of each kind predict cannot use, beside the good ones in `folder`."""
    bad = {
        "corrupt": folder / "corrupt.png",
        "empty": folder / "empty.png",
        "volume": folder / "scan.nii.gz",
        "nan": folder / "nan.tif",
        "folder named like an image": folder / "folder.png",
    }
    bad["corrupt"].write_bytes((folder / f"{STEM}.png").read_bytes()[:200])
    bad["empty"].write_bytes(b"")
    bad["volume"].write_bytes(b"\x1f\x8b\x08 a volume")
    import tifffile

    pixels = np.full((32, 32), 0.5, np.float32)
    pixels[0, :2] = np.nan
    tifffile.imwrite(bad["nan"], pixels)
    bad["folder named like an image"].mkdir()
    return bad


def test_predict_names_every_bad_input_before_writing_anything(run_copy, images, tmp_path):
    bad = _bad_inputs(images)
    inputs = [images, bad["volume"]]  # a folder's .nii.gz is not listed: it is given by name here
    line = predict_refused(run_copy, inputs, tmp_path / "o", fragments=("5 of 9 input(s) cannot be predicted",
                                                                        "--skip-bad"))
    for name in ("corrupt.png", "empty.png", "scan.nii.gz", "nan.tif", "folder.png"):
        assert name in line, line
    assert "medseg slices" in line and "empty (0 bytes)" in line and "NaN or Inf" in line
    assert "image viewer" not in line.split("scan.nii.gz")[1].split(";")[0]


def test_identical_problems_share_one_group(run_copy, images, tmp_path):
    for k in range(5):
        (images / f"empty{k}.png").write_bytes(b"")
    line = predict_refused(run_copy, [images], tmp_path / "o", fragments=("5 of 9 input(s)", "5 files ("))
    assert line.count("empty (0 bytes)") == 1 and "..." in line


def test_skip_bad_predicts_the_rest_and_lists_what_it_skipped(run_copy, images, tmp_path):
    bad = _bad_inputs(images)
    guard, out = Guard(run_copy, images), tmp_path / "o"
    result = medseg_inprocess("predict", str(run_copy), str(images), str(bad["volume"]), "--out", str(out),
                              "--skip-bad")
    assert result.returncode == 0, result.stderr
    guard.check(out)
    stdout = " ".join(result.stdout.split())
    assert "wrote 4 mask(s)" in stdout and stdout.count("skipped ") == 5
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] is True and len(manifest["inputs"]) == 4
    assert sorted(Path(s["input"]).name for s in manifest["skipped"]) == sorted(p.name for p in bad.values())
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{Path(p).stem}.png" for p in manifest["inputs"])


def test_skip_bad_with_nothing_good_is_refused(run_copy, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.png").write_bytes(b"not a png")
    predict_refused(run_copy, [folder], tmp_path / "o", "--skip-bad", fragments=("2 of 2 input(s)",))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["missing file", "empty folder", "folder of volumes", "pattern matching nothing",
                                  "broken link", "broken link in a folder"])
def test_inputs_that_name_no_image(kind, run_copy, images, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    if kind == "missing file":
        given, fragment = tmp_path / "nothing.png", "does not exist"
    elif kind == "empty folder":
        given, fragment = other, "no images"
    elif kind == "folder of volumes":
        (other / "case.nii.gz").write_bytes(b"\x1f\x8b")
        given, fragment = other, "medseg slices"
    elif kind == "pattern matching nothing":
        given, fragment = other / "*.png", "pattern matches no files"
    elif kind == "broken link":
        given, fragment = tmp_path / "link.png", "broken symbolic link"
        given.symlink_to(tmp_path / "gone.png")
    else:
        (images / "link.png").symlink_to(tmp_path / "gone.png")
        given, fragment = images, "broken link"
    line = predict_refused(run_copy, [images, given], tmp_path / "o", fragments=(fragment,))
    assert "input(s) cannot be predicted" in line


def test_an_image_of_a_channel_count_the_network_cannot_take(images, tmp_path):
    from medseg.models import create_model, save_model

    model = tmp_path / "two-channel"
    save_model(create_model("unet", 2, 1, base_channels=4), model,
               extra={"preprocessing": {"size": [64, 64], "in_channels": 2, "normalize": "none"}})
    predict_refused(model, [images], tmp_path / "o", fragments=("4 of 4 input(s)", "3 channel(s)",
                                                                "network takes 2"))


def test_two_inputs_with_one_name(run_copy, images, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(images / f"{STEM}.png", other / f"{STEM}.png")
    predict_refused(run_copy, [images, other], tmp_path / "o", fragments=("share the name", STEM))


def test_the_manifest_records_a_complete_predict(run_copy, images, tmp_path):
    out = tmp_path / "o"
    result = medseg_inprocess("predict", str(run_copy), str(images), "--out", str(out), "--probabilities",
                              "--threshold", "0.4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] is True and manifest["finished"] and manifest["skipped"] == []
    assert manifest["settings"]["threshold"] == 0.4 and manifest["settings"]["device"] == "cpu"
    assert manifest["model"] == str((run_copy / "model").resolve())
    assert len(manifest["inputs"]) == 4 and len(manifest["outputs"]) == 8
    assert all((out / name).is_file() for name in manifest["outputs"])
    assert not leftovers(out)


def test_a_predict_killed_midway_leaves_a_manifest_that_says_incomplete(run_copy, images, tmp_path):
    """A real SIGKILL after the second mask: no handler runs, and predict.json must already say false."""
    out = tmp_path / "o"
    program = (
        "import os, signal, sys\n"
        "import medseg.engine.predict as p\n"
        "real, count = p.write_image_atomic, []\n"
        "def killing(path, array):\n"
        "    real(path, array)\n"
        "    count.append(path)\n"
        "    if len(count) == 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "p.write_image_atomic = killing\n"
        f"sys.argv = ['medseg', 'predict', {str(run_copy)!r}, {str(images)!r}, '--out', {str(out)!r}, '--device', "
        "'cpu', '--batch-size', '1']\n"
        "from medseg.cli import main\n"
        "main()\n"
    )
    guard = Guard(run_copy, images)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr
    guard.check(out)
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["complete"] is False and manifest["finished"] is None and len(manifest["inputs"]) == 4
    assert len(list(out.glob("*.png"))) == 2


# --- 5. command-line usage -----------------------------------------------------------------------------------

USAGE = {
    "unknown option": (["predict", "--bogus"], "No such option: --bogus"),
    "missing argument": (["predict"], "Missing argument"),
    "missing inputs": (["predict", "runs/x"], "Missing argument"),
    "bad integer": (["predict", "r", "i", "--out", "o", "--batch-size", "x"], "--batch-size"),
    "bad float": (["predict", "r", "i", "--out", "o", "--threshold", "half"], "--threshold"),
    "zero batch": (["predict", "r", "i", "--out", "o", "--batch-size", "0"], "--batch-size"),
    "option without value": (["train", "--recipe"], "requires an argument"),
    "unknown command": (["predcit"], "predcit"),
    "extra argument": (["models", "extra"], "extra"),
    "evaluate bad integer": (["evaluate", "r", "--overlays", "many"], "--overlays"),
    "benchmark bad integer": (["benchmark", "--batch", "x"], "--batch"),
    "check-data classes zero": (["check-data", "d", "--num-classes", "0"], "--num-classes"),
}


@pytest.mark.parametrize("case", sorted(USAGE))
def test_a_usage_error_is_one_line(case, tmp_path):
    args, fragment = USAGE[case]
    result = medseg_inprocess(*args)
    line = refused(result, fragment)
    assert "--help" in line and "╭" not in result.stderr + result.stdout
    assert len([x for x in result.stderr.splitlines() if x.strip()]) == 1


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["predict", "--help"], ["benchmark", "--help"]])
def test_help_and_version_still_exit_zero(args):
    result = medseg_inprocess(*args)
    assert result.returncode == 0 and result.stderr == "" and result.stdout.strip()


def test_no_arguments_prints_the_help():
    result = medseg_inprocess()
    assert result.returncode == 2 and "Usage" in result.stdout and "Traceback" not in result.stderr


# --- 6. the rest ---------------------------------------------------------------------------------------------

def test_a_level_on_a_network_without_levels(run_copy, images, tmp_path):
    predict_refused(run_copy, [images], tmp_path / "o", "--level", "2", fragments=("no pruning levels",))


@pytest.mark.parametrize("level, fragment", [("0", "start at 1"), ("5", "levels 1, 2, 3, 4")])
def test_a_pruning_level_the_network_lacks(level, fragment, images, tmp_path):
    from medseg.models import create_model, save_model

    model = tmp_path / "anunet"
    save_model(create_model("anunet", 3, 1), model,
               extra={"preprocessing": {"size": [64, 64], "in_channels": 3, "normalize": "imagenet"}})
    predict_refused(model, [images], tmp_path / "o", "--level", level, fragments=("level", fragment))


def test_benchmark_levels_that_are_not_numbers():
    refused(medseg_inprocess("benchmark", "--models", "anunet", "--levels", "1,two"), "--levels")


def test_a_file_given_as_images_is_reported_not_crashed(run_copy, images, tmp_path):
    (images / "notes.png").write_text("these are notes, not an image")
    predict_refused(run_copy, [images], tmp_path / "o", fragments=("notes.png", "1 of 5 input(s)"))


def test_an_existing_out_folder_keeps_its_other_files(run_copy, images, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = medseg_inprocess("predict", str(run_copy), str(images / f"{STEM}.png"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / f"{STEM}.png").is_file()
    assert np.array(Image.open(out / f"{STEM}.png")).shape == (64, 64)
