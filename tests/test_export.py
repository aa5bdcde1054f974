"""`medseg export` (ONNX, TorchScript) with its parity check, and `medseg predict` from an exported ONNX folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import leftovers, medseg_inprocess, refused, run_cli
from medseg.engine import export as export_module
from medseg.engine.export import export
from medseg.engine.onnx_predictor import SIDECAR
from medseg.errors import MedsegError
from medseg.models import create_model, load_model, save_model

# The five seed networks at 64 px with random weights (U-Net, exported from a trained run, is in the predict tests
# below). The dynamo exporter takes half a minute to three minutes per network on 2 busy cores, the
# TorchScript-based one a few seconds: Fovea-UNet (custom pooling) goes through the default (dynamo first), the
# others through the TorchScript-based exporter, to keep the suite's time.
SEEDS = [("m2snet", {}, "torchscript"), ("anunet", {}, "torchscript"), ("stsnet", {}, "torchscript"),
         ("focusnet", {}, "torchscript"), ("fovea_unet", {}, "auto")]
SIZE = 64


def model_folder(tmp_path: Path, name: str, options: dict, size: int = SIZE) -> Path:
    torch.manual_seed(0)
    return save_model(create_model(name, 3, 1, **options), tmp_path / f"{name}-model",
                      extra={"preprocessing": {"size": [size, size], "in_channels": 3, "normalize": "imagenet"}})


@pytest.mark.parametrize(("name", "options", "exporter"), SEEDS, ids=[s[0] for s in SEEDS])
def test_seed_networks_export_to_onnx_with_parity(tmp_path, name, options, exporter):
    import onnxruntime

    folder = model_folder(tmp_path, name, options)
    out = tmp_path / "export"
    sidecar = export(folder, "onnx", out, exporter=exporter)
    assert sorted(p.name for p in out.iterdir()) == ["medseg-export.json", "model.onnx"]  # weights inside the file
    assert json.loads((out / SIDECAR).read_text()) == sidecar
    assert sidecar["parity"]["passed"] and sidecar["parity"]["max_abs_error"] <= 1e-4
    assert sidecar["network"] == name and sidecar["activation"] == "sigmoid" and sidecar["activation_in_graph"]
    assert sidecar["preprocessing"]["normalize_values"]["mean"] == [0.485, 0.456, 0.406]
    assert sidecar["preprocessing"]["export_size"] == [SIZE, SIZE] and not sidecar["dynamic"]
    assert sidecar["exporter"].startswith("torch.onnx.export(dynamo=" + ("False" if exporter == "torchscript" else ""))
    # a new input of another batch size: the batch dimension is dynamic, the output the network's probabilities
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": images.numpy()})[0]
    with torch.no_grad():
        want = torch.sigmoid(load_model(folder)(images)).numpy()
    assert got.shape == (3, 1, SIZE, SIZE)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_a_failing_parity_check_writes_nothing(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, "unet", {"base_channels": 4})
    runner = export_module._onnx_runner

    def off_by_a_little(file):  # what a wrong conversion looks like: outputs that differ from PyTorch's
        run = runner(file)
        return lambda x: run(x) + 0.01

    monkeypatch.setattr(export_module, "_onnx_runner", off_by_a_little)
    with pytest.raises(MedsegError, match=r"parity check failed.*up to 0\.01.*nothing was written"):
        export(folder, "onnx", tmp_path / "export", exporter="torchscript")
    assert not (tmp_path / "export").exists() and leftovers(tmp_path) == []


def test_an_earlier_export_is_replaced_and_any_other_folder_refused(tmp_path):
    folder = model_folder(tmp_path, "unet", {"base_channels": 4})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    line = refused(medseg_inprocess("export", str(folder), "--format", "onnx", "--out", str(busy)),
                   "not an earlier export")
    assert "medseg-export.json" in line and (busy / "notes.txt").read_text() == "mine"
    out = tmp_path / "export"
    export(folder, "torchscript", out)
    export(folder, "onnx", out, exporter="torchscript")
    assert sorted(p.name for p in out.iterdir()) == ["medseg-export.json", "model.onnx"]
    refused(medseg_inprocess("export", str(folder), "--format", "torchscript", "--opset", "17", "--out", str(out)),
            "--opset applies to --format onnx only")


def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, "unet", {"base_channels": 4})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when not installed
    line = refused(medseg_inprocess("export", str(folder), "--format", "onnx", "--out", str(tmp_path / "e")),
                   "pip install 'medseg[export]'")
    assert "onnxruntime" in line and not (tmp_path / "e").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(tmp_path):
    folder = model_folder(tmp_path, "unet", {"base_channels": 4})
    sidecar = export(folder, "torchscript", tmp_path / "ts", dynamic=True)
    assert sidecar["exporter"] == "torch.jit.trace" and sidecar["parity"]["passed"]
    loaded = torch.jit.load(str(tmp_path / "ts" / "model.pt"))
    images = torch.randn(2, 3, 48, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), torch.sigmoid(load_model(folder)(images)), rtol=1e-3, atol=1e-4)
    refused(medseg_inprocess("predict", str(tmp_path / "ts"), str(tmp_path), "--out", str(tmp_path / "p")),
            "torchscript export", "--format onnx")


def mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_predict_from_an_onnx_export_writes_the_run_s_masks(tiny_run, phantom, tmp_path):
    """Exported from a trained run: parity on the run's own images; the ONNX folder predicts the masks the run
    predicts. Equal masks are expected except for a pixel whose probability lies within the parity tolerance of
    the threshold: at least 99.9 % of pixels must agree."""
    exported = tmp_path / "onnx"
    result = run_cli("export", str(tiny_run.path), "--format", "onnx", "--out", str(exported))  # as a user runs it
    assert result.returncode == 0 and "parity on" in result.stdout, result.stderr
    sidecar = json.loads((exported / SIDECAR).read_text())
    assert sidecar["parity"]["passed"] and sidecar["exporter"] == "torch.onnx.export(dynamo=True)"
    assert sidecar["parity"]["inputs"].startswith("real: ") and str(phantom) in sidecar["parity"]["inputs"]
    images = sorted((phantom / "images").glob("*.png"))[:4]
    for source, out in ((tiny_run.path, tmp_path / "from-run"), (exported, tmp_path / "from-onnx")):
        result = medseg_inprocess("predict", str(source), *map(str, images), "--out", str(out), "--precision", "32",
                                  "--device", "cpu", "--probabilities")
        assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "from-onnx" / "predict.json").read_text())
    assert manifest["complete"] and manifest["model"] == str(exported.resolve())
    for image in images:
        run_mask, onnx_mask = mask(tmp_path / "from-run" / f"{image.stem}.png"), mask(tmp_path / "from-onnx" /
                                                                                       f"{image.stem}.png")
        assert run_mask.shape == onnx_mask.shape == mask(image).shape[:2]
        assert set(np.unique(onnx_mask)) <= {0, 255}
        assert (run_mask == onnx_mask).mean() >= 0.999
        run_prob = mask(tmp_path / "from-run" / f"{image.stem}_prob.png").astype(int)
        assert np.abs(run_prob - mask(tmp_path / "from-onnx" / f"{image.stem}_prob.png")).max() <= 1
    refused(medseg_inprocess("predict", str(exported), str(images[0]), "--out", str(tmp_path / "n"), "--native"),
            "--native", "fixed size 64x64", "--dynamic")
    refused(medseg_inprocess("predict", str(exported), str(images[0]), "--out", str(tmp_path / "n"), "--level", "2"),
            "cannot be pruned")


def test_a_dynamic_onnx_export_predicts_at_native_size(tmp_path, kvasir):
    folder = model_folder(tmp_path, "unet", {"base_channels": 4})
    exported = tmp_path / "onnx"
    sidecar = export(folder, "onnx", exported, dynamic=True)
    assert sidecar["dynamic"] and sidecar["input"]["shape"] == ["batch", 3, "height", "width"]
    assert sidecar["parity"]["passed"] and sidecar["parity"]["sizes"] == [[SIZE, SIZE], [80, 80]]
    image = sorted((kvasir / "images").glob("*.jpg"))[0]  # a real photograph of its own odd size
    for source, out in ((folder, tmp_path / "from-model"), (exported, tmp_path / "from-onnx")):
        result = medseg_inprocess("predict", str(source), str(image), "--out", str(out), "--native", "--precision",
                                  "32", "--device", "cpu")
        assert result.returncode == 0, result.stderr
    run_mask, onnx_mask = mask(tmp_path / "from-model" / f"{image.stem}.png"), mask(tmp_path / "from-onnx" /
                                                                                   f"{image.stem}.png")
    assert onnx_mask.shape == np.asarray(Image.open(image)).shape[:2]
    assert (run_mask == onnx_mask).mean() >= 0.999


def test_export_help_has_an_example():
    from typer.testing import CliRunner

    from medseg.cli import app

    help_text = CliRunner().invoke(app, ["export", "--help"], terminal_width=200)
    assert help_text.exit_code == 0 and "Example: medseg export" in help_text.stdout and "--dynamic" in help_text.stdout


def test_a_network_the_dynamo_exporter_fails_on_falls_back_and_says_so(tmp_path, monkeypatch):
    folder = model_folder(tmp_path, "unet", {"base_channels": 4})
    real_export = torch.onnx.export

    def dynamo_fails(*args, dynamo=True, **kwargs):  # as torch.export fails on an untraceable op
        if dynamo:
            raise RuntimeError("Failed to export the model with torch.export")
        return real_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    sidecar = export(folder, "onnx", tmp_path / "export")
    assert sidecar["exporter"] == ("torch.onnx.export(dynamo=False) (dynamo failed: Failed to export the model with "
                                   "torch.export)")
    assert sidecar["parity"]["passed"]
    with pytest.raises(MedsegError, match="the dynamo ONNX exporter failed.*--exporter torchscript"):
        export(folder, "onnx", tmp_path / "export", exporter="dynamo")
    assert json.loads((tmp_path / "export" / SIDECAR).read_text()) == sidecar  # the earlier export is kept


def test_a_damaged_export_folder_or_a_missing_cuda_provider_is_one_line(tmp_path, kvasir):
    from medseg.engine.onnx_predictor import _providers

    image = str(sorted((kvasir / "images").glob("*.jpg"))[0])
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / SIDECAR).write_text("{not json")
    refused(medseg_inprocess("predict", str(damaged), image, "--out", str(tmp_path / "p")), "not valid JSON",
            "export the run again")
    (damaged / SIDECAR).write_text(json.dumps({"format": 1, "kind": "onnx", "file": "model.onnx"}))
    refused(medseg_inprocess("predict", str(damaged), image, "--out", str(tmp_path / "p")), "lacks network")
    assert not (tmp_path / "p").exists()
    with pytest.raises(MedsegError, match="no CUDA provider.*--device cpu"):
        _providers("cuda", ["CPUExecutionProvider"])
    device, providers = _providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert str(device) == "cuda:1" and providers[0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert _providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[1] == ["CPUExecutionProvider"]


def test_an_export_carries_the_model_s_tiles_and_tuned_threshold(tmp_path, kvasir):
    """A network trained on crops predicts in tiles of its crop, and a tuned threshold decides its masks: both
    travel in the sidecar, and predict from the ONNX folder uses them as predict from the model folder does."""
    torch.manual_seed(0)
    folder = save_model(create_model("unet", 3, 1, base_channels=4), tmp_path / "model",
                        extra={"preprocessing": {"size": [96, 96], "in_channels": 3, "normalize": "imagenet",
                                                 "crop": [32, 32]}})
    (folder / "threshold.json").write_text(json.dumps({"threshold": 0.3}))
    sidecar = export(folder, "onnx", tmp_path / "export", exporter="torchscript")
    assert sidecar["threshold"] == 0.3 and sidecar["preprocessing"]["export_size"] == [32, 32]  # the tile, fixed
    image = sorted((kvasir / "images").iterdir())[0]
    for source, out in ((folder, tmp_path / "from-model"), (tmp_path / "export", tmp_path / "from-onnx")):
        run_cli("predict", str(source), str(image), "--out", str(out), "--device", "cpu", "--precision", "32")
    manifests = [json.loads((tmp_path / name / "predict.json").read_text()) for name in ("from-model", "from-onnx")]
    for manifest in manifests:
        assert manifest["settings"]["threshold"] == 0.3
        assert manifest["settings"]["inference"]["tiling"]["tile"] == [32, 32]
    masks = [mask(tmp_path / name / f"{image.stem}.png") for name in ("from-model", "from-onnx")]
    assert masks[0].shape == Image.open(image).size[::-1] and (masks[0] == masks[1]).mean() >= 0.999
