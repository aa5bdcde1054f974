"""Precision and memory format as one choice: `auto` per machine and network, fp32 islands under autocast, and
the choice recorded in the run and the evaluation."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import TINY
from medseg.config import load_recipe
from medseg.engine.evaluate import evaluate
from medseg.engine.precision import choose_numeric_mode, cpu_bf16_flags
from medseg.engine.train import train
from medseg.models import model_info
from medseg.models.fovea_pooling import FoveaPooling


def test_auto_is_bf16_channels_last_only_on_a_cpu_with_bf16_instructions():
    unet, fovea = model_info("unet").card, model_info("fovea_unet").card
    fast = choose_numeric_mode("auto", unet, "cpu", bf16_flags=["avx512_bf16"])
    assert (fast.precision, fast.channels_last, fast.autocast_dtype) == ("bf16-mixed", True, torch.bfloat16)
    assert "avx512_bf16" in fast.describe() and "channels_last" in fast.describe()
    plain = choose_numeric_mode("auto", unet, "cpu", bf16_flags=[])
    assert (plain.precision, plain.channels_last, plain.autocast_dtype) == ("32-true", False, None)
    declined = choose_numeric_mode("auto", fovea, "cpu", bf16_flags=["amx_bf16"])
    assert (declined.precision, declined.channels_last) == ("32-true", False)
    assert "does not pay" in declined.reason
    # bf16 asked for on a CPU always goes with channels_last (bf16 in NCHW is several times slower)
    assert choose_numeric_mode("bf16-mixed", unet, "cpu", bf16_flags=[]).channels_last
    assert choose_numeric_mode("32", unet, "cpu", bf16_flags=["avx512_bf16"]).precision == "32-true"


def test_bf16_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_bf16_flags(cpuinfo) == ["avx512_bf16", "amx_bf16"]
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    assert cpu_bf16_flags(cpuinfo) == []
    assert cpu_bf16_flags(tmp_path / "missing") == []


@pytest.mark.parametrize("aggregation", ["lp", "avg", "mixed"])
def test_fovea_pooling_under_cpu_autocast_equals_its_fp32_result(aggregation):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    pool = FoveaPooling(0.25, aggregation)
    images, importance = torch.randn(2, 3, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(images)  # bf16, as a network's features are under autocast
        pooled = pool(features, importance)
    assert features.dtype == torch.bfloat16 and pooled.dtype == torch.bfloat16
    reference = pool(features.float(), importance)  # the same values pooled in fp32, outside autocast
    assert torch.equal(pooled, reference.to(torch.bfloat16))


def test_a_bf16_run_records_its_mode_and_saves_fp32_weights(phantom, tmp_path, capsys):
    recipe = load_recipe("unet", [*TINY, "train.epochs=1", "train.precision=bf16-mixed"])
    run = train(recipe, phantom, out=tmp_path, name="bf16", progress=False)
    assert "precision: bf16-mixed, channels_last" in capsys.readouterr().out
    numeric = yaml.safe_load(run.config_file.read_text())["run"]["numeric"]
    assert numeric["precision"] == "bf16-mixed" and numeric["channels_last"] is True
    weights = load_file(run.model_dir / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}
    folder = evaluate(run.path, phantom, overlays=0, workers=0, precision="32")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["numeric"]["precision"] == "32-true" and 0 <= summary["metrics"]["dice"]["value"] <= 1


def test_the_allocator_is_tuned_on_glibc_unless_the_user_keeps_its_defaults(monkeypatch):
    import ctypes
    import sys

    from medseg.engine.allocator import KEEP_DEFAULTS, tune_allocator

    if not sys.platform.startswith("linux"):
        assert tune_allocator() is False
        return
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    assert tune_allocator() is True
    assert calls == [(-3, 32 << 20), (-1, 1 << 30)]  # M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB
    monkeypatch.setenv(KEEP_DEFAULTS, "1")
    assert tune_allocator() is False and len(calls) == 2
