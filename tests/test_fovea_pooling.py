"""Fovea Pooling (Fovea-UNet, BioMedical Engineering OnLine 2023, "Fovea pooling" Eq. 6-8) against a brute-force
per-pixel window loop, gradients, and its benchmark command."""

import json
import math

import numpy as np
import pytest
import torch

from medseg.models.fovea_pooling import FoveaPooling, fovea_max_radius, fovea_pool, fovea_pool_loop, fovea_radius


def brute_force(x, importance, max_radius, aggregation, hard, p=2.0, eps=1e-6, mix=0.5):
    """An independent reference in numpy: numpy's 'reflect' padding equals torch's, 'edge' is 'replicate'."""
    x64 = x.double().numpy()
    b, c, h, w = x64.shape
    pad = max_radius - 1
    mode = "reflect" if pad < min(h, w) else "edge"
    padded = np.pad(x64, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)
    rho = np.clip(np.exp(math.log(max_radius) * (1 - importance.double().numpy()[:, 0])), 1, max_radius)
    out = np.zeros_like(x64)

    def pooled(window):
        if aggregation == "avg":
            return window.mean(axis=(-2, -1))
        if aggregation == "lp":
            return (np.mean(np.abs(window) ** p, axis=(-2, -1)) + eps) ** (1 / p)
        return mix * window.max(axis=(-2, -1)) + (1 - mix) * window.mean(axis=(-2, -1))

    for n in range(b):
        for y in range(h):
            for x_ in range(w):
                low = int(np.floor(rho[n, y, x_]))
                fraction = rho[n, y, x_] - low
                radii = [(low, 1.0)] if hard else [(low, 1 - fraction), (min(low + 1, max_radius), fraction)]
                for r, weight in radii:
                    yc, xc = y + pad, x_ + pad
                    window = padded[n, :, yc - r + 1:yc + r, xc - r + 1:xc + r]
                    out[n, :, y, x_] += weight * pooled(window)
    return torch.from_numpy(out)


def test_the_library_loop_matches_the_numpy_reference():
    torch.manual_seed(5)
    x, importance = torch.randn(1, 2, 7, 9), torch.rand(1, 1, 7, 9)
    for aggregation, hard in (("avg", True), ("lp", False), ("mixed", False)):
        got = fovea_pool_loop(x.double(), importance.double(), 4, aggregation, hard=hard, mix=0.3)
        assert torch.allclose(got, brute_force(x, importance, 4, aggregation, hard, mix=0.3), atol=1e-9)


@pytest.mark.parametrize("aggregation", ["avg", "lp", "mixed"])
@pytest.mark.parametrize("hard", [True, False])
def test_equals_brute_force_with_reflect_borders(aggregation, hard):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 13, 11)
    importance = torch.rand(2, 1, 13, 11)
    importance[0, 0, 0, 0], importance[1, 0, -1, -1] = 0.0, 1.0  # corners: the largest window and none
    mix = torch.tensor(0.3)
    got = fovea_pool(x.double(), importance.double(), 5, aggregation, hard=hard, mix=mix.double())
    expected = brute_force(x, importance, 5, aggregation, hard, mix=0.3)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_replicate_padding_when_the_map_is_smaller_than_the_radius():
    torch.manual_seed(1)
    x, importance = torch.randn(1, 2, 4, 6), torch.zeros(1, 1, 4, 6)
    got = fovea_pool(x.double(), importance.double(), 6, "avg", hard=True)
    assert torch.allclose(got, brute_force(x, importance, 6, "avg", True), atol=1e-6)


def test_identity_and_radius_one():
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(fovea_pool(x, torch.rand(1, 1, 8, 8), 4, "identity"), x)
    assert torch.allclose(fovea_pool(x, torch.ones(1, 1, 8, 8), 4, "avg"), x, atol=1e-6)  # Z = 1: r = 1
    assert torch.allclose(fovea_pool(x, torch.rand(1, 1, 8, 8), 1, "avg"), x)  # R = 1


def test_radius_rule_and_boundaries():
    assert fovea_max_radius(1 / 8, 256) == 32 and fovea_max_radius(1 / 16, 128) == 8  # Fig. 4 boundaries, 512 px
    assert fovea_max_radius(1 / 8, 4) == 1
    rho = fovea_radius(torch.tensor([0.0, 0.5, 1.0]), 32)
    assert torch.allclose(rho, torch.tensor([32.0, math.sqrt(32), 1.0]))


def test_large_map_is_numerically_safe():
    torch.manual_seed(2)
    x = torch.randn(1, 1, 96, 96) * 10 + 1000  # a large offset ruins float32 prefix sums
    importance = torch.rand(1, 1, 96, 96)
    got = fovea_pool(x, importance, 8, "avg", hard=True)
    expected = brute_force(x, importance, 8, "avg", True)
    assert (got.double() - expected).abs().max() < 1e-3  # float32 output of values near 1000


def test_soft_mode_gradcheck_in_float64():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    # keep rho away from integers, where the floor switches windows
    importance = (torch.rand(1, 1, 6, 7, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    for aggregation in ("avg", "lp"):
        assert torch.autograd.gradcheck(lambda a, z: fovea_pool(a, z, 4, aggregation), (x, importance), atol=1e-6)
    mix = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    def mixed(a, z, m):
        return fovea_pool(a, z, 4, "mixed", mix=m)

    assert torch.autograd.gradcheck(mixed, (x, importance, mix), atol=1e-6)


def test_importance_gets_gradient_in_soft_mode_only():
    torch.manual_seed(4)
    x = torch.randn(1, 2, 12, 12)
    for hard, expect in ((False, True), (True, False)):
        importance = torch.rand(1, 1, 12, 12, requires_grad=True)
        out = fovea_pool(x, importance, 4, "lp", hard=hard).pow(2).sum()
        if expect:
            out.backward()
            assert importance.grad.abs().sum() > 0
        else:
            assert not out.requires_grad or importance.grad is None  # floor(): no path to Z


def test_module_learns_the_mixed_weight():
    module = FoveaPooling(1 / 4, "mixed")
    x = torch.randn(2, 3, 16, 16)
    out = module(x, torch.rand(2, 1, 16, 16))
    out.sum().backward()
    assert out.shape == x.shape and module.theta.grad is not None and module.theta.grad != 0
    with pytest.raises(ValueError, match="aggregation"):
        FoveaPooling(1 / 8, "max")


def test_benchmark_fovea_pool_command_and_its_deprecated_flag(tmp_path):
    from typer.testing import CliRunner

    from medseg.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["benchmark", "fovea-pool", "--size", "32", "--device", "cpu", "--repeats", "1",
                                 "--json", str(tmp_path / "fp.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "fp.json").read_text())
    assert report["network_input"] == "3x32x32" and report["map"] == "16x128x128" and report["max_radius"] == 16
    assert report["max_abs_difference"] < 1e-5 and report["speedup"] > 1 and report["forward_ms"] > 0
    assert 0 < report["importance_share"] < 1 and 0 < report["pooling_share"] < 1
    assert "speedup:" in result.stdout

    old = runner.invoke(app, ["benchmark", "--fovea-pool", "--size", "32", "--device", "cpu", "--repeats", "1"])
    assert old.exit_code == 0, old.output
    assert "deprecated; use `medseg benchmark fovea-pool`" in old.stderr and "network_input: 3x32x32" in old.stdout
