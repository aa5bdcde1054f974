"""The `medseg` command as a user runs it: subprocesses, real files, one-line errors."""

import importlib.metadata
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import typer
from PIL import Image

from conftest import run_cli
from medseg.engine.benchmark import benchmark_model, count_flops
from medseg.models import create_model

KVASIR_621x530 = "cju0s690hkp960855tjuaqvv0"


@pytest.fixture()
def broken_data(kvasir, tmp_path):
    """Five real Kvasir pairs, then: a missing mask, a corrupt image, a size-mismatched pair, a {0,1,2} mask."""
    root = tmp_path / "broken"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    stems = sorted(p.stem for p in (kvasir / "images").glob("*.jpg"))[:8]
    for stem in stems:
        shutil.copy(kvasir / "images" / f"{stem}.jpg", root / "images")
        shutil.copy(kvasir / "masks" / f"{stem}.png", root / "masks")
    (root / "masks" / f"{stems[0]}.png").unlink()
    (root / "images" / f"{stems[1]}.jpg").write_bytes(b"not a jpeg at all")
    mask = Image.open(root / "masks" / f"{stems[2]}.png")
    mask.resize((mask.width // 2, mask.height // 2), Image.NEAREST).save(root / "masks" / f"{stems[2]}.png")
    labels = (np.array(Image.open(root / "masks" / f"{stems[3]}.png")) > 0).astype(np.uint8)
    labels[:10, :10] = 2
    Image.fromarray(labels).save(root / "masks" / f"{stems[3]}.png")
    return root, stems


def test_check_data_lists_every_problem_with_its_file(broken_data):
    root, stems = broken_data
    result = run_cli("check-data", str(root))
    assert result.returncode == 1
    out = " ".join(result.stdout.split())
    assert f"unpaired-image images/{stems[0]}.jpg" in out
    assert f"unreadable images/{stems[1]}.jpg" in out
    assert f"size-mismatch masks/{stems[2]}.png" in out or f"size-mismatch images/{stems[2]}.jpg" in out
    assert f"mask-values masks/{stems[3]}.png" in out and "{0, 1, 2}" in out
    assert "4 error(s)" in out
    for clean in stems[4:]:
        assert clean not in out


def test_train_on_bad_data_stops_with_one_line(broken_data, tmp_path):
    root, _ = broken_data
    result = run_cli("train", "--recipe", "unet", "--data", str(root), "--out", str(tmp_path / "runs"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "medseg check-data" in lines[0] and "see all 4 problem(s)" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_evaluate_writes_per_case_summary_report_and_overlays(tiny_run, phantom):
    result = run_cli("evaluate", str(tiny_run.path), "--data", str(phantom), "--overlays", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tiny_run.path / "eval" / phantom.name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["protocol"]["name"] == "paper" and summary["protocol"]["threshold"] == 0.5
    assert summary["split"] == "test" and summary["cases"] == len(json.loads(tiny_run.splits_file.read_text())["test"])
    assert summary["synthetic"] is True
    expected = {"dice", "iou", "sensitivity", "specificity", "precision", "accuracy", "mdice", "miou"}
    assert expected <= set(summary["metrics"])
    rows = (folder / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("stem,height,width,mask_pixels,predicted_pixels,dice")
    assert len(rows) == summary["cases"] + 1
    report = (folder / "report.md").read_text()
    assert "SYNTHETIC" in report and "| dice |" in report and "overlays/" in report
    assert len(list((folder / "overlays").glob("*.png"))) == 4
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_evaluate_other_protocols_and_a_foreign_dataset(tiny_run, kvasir, tmp_path):
    data = tmp_path / "few"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for stem in sorted(p.stem for p in (kvasir / "images").glob("*.jpg"))[:3]:
        shutil.copy(kvasir / "images" / f"{stem}.jpg", data / "images")
        shutil.copy(kvasir / "masks" / f"{stem}.png", data / "masks")
    result = run_cli("evaluate", str(tiny_run.path), "--data", str(data), "--protocol", "nnunet", "--overlays", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tiny_run.path / "eval" / "few-nnunet" / "summary.json").read_text())
    assert summary["split"] == "all" and summary["cases"] == 3 and summary["protocol"]["empty"] == "nan"
    bad = run_cli("evaluate", str(tiny_run.path), "--data", str(data), "--protocol", "dice-ish")
    assert bad.returncode == 2 and "unknown metric protocol 'dice-ish'" in bad.stderr


def test_predict_writes_masks_at_each_input_size(tiny_run, kvasir, phantom, tmp_path):
    image = kvasir / "images" / f"{KVASIR_621x530}.jpg"
    out = tmp_path / "pred"
    result = run_cli("predict", str(tiny_run.path), str(image), str(phantom / "images" / "*.png"), "--out", str(out),
                     "--overlay", "--probabilities")
    assert result.returncode == 0, result.stderr[-2000:]
    mask = Image.open(out / f"{KVASIR_621x530}.png")
    assert mask.size == (621, 530) and mask.mode == "L"
    assert set(np.unique(np.array(mask))) <= {0, 255}
    assert Image.open(out / f"{KVASIR_621x530}_prob.png").size == (621, 530)
    assert Image.open(out / f"{KVASIR_621x530}_overlay.png").size == (621, 530)
    assert len(list(out.glob("phantom_*_overlay.png"))) == 24
    native = run_cli("predict", str(tiny_run.path / "model"), str(image), "--out", str(tmp_path / "native"), "--native")
    assert native.returncode == 0, native.stderr[-2000:]
    assert Image.open(tmp_path / "native" / f"{KVASIR_621x530}.png").size == (621, 530)
    missing = run_cli("predict", str(tiny_run.path), str(tmp_path / "nothing.png"), "--out", str(out))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_flops_match_an_analytic_count_of_every_conv():
    model = create_model("unet", 3, 1, base_channels=8).eval()
    expected = []

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        spatial = (inputs[0] if isinstance(module, torch.nn.ConvTranspose2d) else output).shape[-2:]
        expected.append(2 * module.in_channels * module.out_channels * k * spatial[0] * spatial[1] // module.groups)

    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(hook)
    flops = count_flops(model, torch.randn(1, 3, 64, 64))
    assert flops == sum(expected) > 0


def test_benchmark_reports_cost_and_speed(tmp_path):
    result = benchmark_model("unet", (32, 32), batch=2, device="cpu", warmup=0, repeats=1)
    assert result["params"] == 31_037_633 and result["gmacs"] == pytest.approx(result["gflops"] / 2)
    assert result["latency_ms_b1"] > 0 and result["throughput_bn"] > 0
    cli = run_cli("benchmark", "--models", "unet", "--size", "32", "--batch", "2", "--warmup", "0", "--repeats", "1",
                  "--json", str(tmp_path / "bench.json"), "--markdown")
    assert cli.returncode == 0, cli.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["results"][0]["model"] == "unet" and report["machine"]["torch"]
    assert "| unet | 3x32x32 | 31,037,633 |" in cli.stdout


def test_the_command_line_starts_without_torch_and_prints_its_version():
    import subprocess
    import sys

    heavy = ("torch", "torchvision", "lightning", "timm", "segmentation_models_pytorch", "matplotlib", "scipy")
    loaded = subprocess.run([sys.executable, "-c", "import sys, medseg.cli; print(sorted(set(sys.modules) & "
                             f"set({heavy!r})))"], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"medseg {importlib.metadata.version('medseg')}"


def test_models_and_help():
    from typer.testing import CliRunner

    from medseg.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["models"], terminal_width=200)
    assert result.exit_code == 0 and "unet" in result.stdout and "31,037,633" in result.stdout
    assert "39,105,873" in result.stdout  # stsnet counted with its paper's two-class head
    for command in ("train", "evaluate", "predict", "benchmark", "check-data", "demo", "models", "amplify", "slices",
                    "study"):
        help_text = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert help_text.exit_code == 0 and "Example" in help_text.stdout, command
    benchmark_help = runner.invoke(app, ["benchmark", "--help"], terminal_width=200).stdout
    assert "--models" in benchmark_help and "fovea-pool" in benchmark_help  # today's options and the subcommand
    assert "--fovea-pool" not in benchmark_help  # the deprecated flag still works but is hidden
    fovea_help = runner.invoke(app, ["benchmark", "fovea-pool", "--help"], terminal_width=200)
    assert fovea_help.exit_code == 0 and "Example: medseg benchmark fovea-pool" in fovea_help.stdout


def test_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    from medseg.engine.demo import demo, summary_line

    folder = demo(tmp_path / "demo", epochs=1, images=24, progress=False)
    assert "SYNTHETIC" in (folder / "report.md").read_text()
    assert "synthetic phantom" in summary_line(folder)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, typer.Abort])
def test_an_interrupted_command_says_so_in_one_line(stop, monkeypatch, capsys):
    import medseg.cli as cli

    def interrupted(*args, **kwargs):
        raise stop()

    monkeypatch.setattr(cli, "Table", interrupted)  # `medseg models` stopped while it builds its table
    monkeypatch.setattr(sys, "argv", ["medseg", "models"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"
