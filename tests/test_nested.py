"""UNet++ / ANU-Net: parameter counts against the paper, pruning, deep supervision, hybrid loss."""

import copy
import math

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

import medseg
from medseg.errors import MedsegError
from medseg.losses import build_loss, create_loss
from medseg.models import save_model

# ANU-Net Table 6 (millions of parameters) and ours (in = 3, head N only).
TABLE_6 = {1: 0.1038e6, 2: 0.5134e6, 3: 2.1918e6, 4: 8.9506e6}
OURS = {1: 103_188, 2: 520_829, 3: 2_245_503, 4: 9_203_741}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_pruned_parameter_counts_are_pinned_and_within_3_percent_of_table_6(level):
    model = medseg.create_model("anunet", 3, 1).prune(level)
    assert n_params(model) == OURS[level]
    assert abs(OURS[level] - TABLE_6[level]) / TABLE_6[level] < 0.03


def test_full_network_counts():
    assert n_params(medseg.create_model("anunet", 3, 1)) == 9_203_840  # four deep-supervision heads
    assert n_params(medseg.create_model("anunet", 1, 1).prune(4)) == 9_203_165
    assert n_params(medseg.create_model("unetpp", 3, 1)) == 9_049_572
    anunet = medseg.create_model("anunet", 3, 1)
    assert len(anunet.gates) == 20  # one gate per (node, skip) pair in L4


@pytest.fixture(scope="module")
def trained_like():
    """An ANU-Net whose BatchNorm statistics are no longer the defaults, in eval mode."""
    torch.manual_seed(0)
    model = medseg.create_model("anunet", 3, 1)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_pruned_forward_equals_the_full_networks_head(trained_like, level):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(level))
    with torch.no_grad():
        full = trained_like.forward_heads(x, 4)[level]
        partial = trained_like(x, level=level)
        pruned = copy.deepcopy(trained_like).prune(level)(x)
    assert torch.allclose(partial, full, atol=1e-6)
    assert torch.allclose(pruned, full, atol=1e-6)


def test_a_saved_pruned_model_is_smaller_loads_and_predicts(trained_like, tmp_path):
    full_dir = save_model(copy.deepcopy(trained_like), tmp_path / "full")
    pruned = copy.deepcopy(trained_like).prune(2)
    pruned_dir = save_model(pruned, tmp_path / "l2")
    assert (pruned_dir / "model.safetensors").stat().st_size < (full_dir / "model.safetensors").stat().st_size / 10
    loaded = medseg.load_model(pruned_dir)
    assert loaded.level == 2 and loaded.pruned and n_params(loaded) == n_params(pruned)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), trained_like(x, level=2), atol=1e-6)
    with pytest.raises(MedsegError, match="cannot prune to level 3"):
        loaded.prune(3)


def test_training_returns_all_heads_main_first_and_eval_one():
    model = medseg.create_model("anunet", 3, 1)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()  # deterministic normalisation, so outputs can be compared
    x = torch.randn(1, 3, 32, 32)
    outputs = model(x)
    heads = model.forward_heads(x, 4)
    assert len(outputs) == 4 and all(torch.allclose(o, heads[j]) for o, j in zip(outputs, (4, 3, 2, 1)))
    loss, _ = build_loss([{"name": "anunet_hybrid"}])(outputs, torch.zeros(1, 32, 32, dtype=torch.long))
    loss.backward()
    assert all(model.heads[f"y{j}"].weight.grad.abs().sum() > 0 for j in (1, 2, 3, 4))
    model.eval()
    assert model(x).shape == (1, 1, 32, 32)


def test_unetpp_has_no_gates_and_first_layer_attention_of_anunet():
    assert len(medseg.create_model("unetpp", 3, 1).gates) == 0
    model = medseg.create_model("anunet", 3, 1).eval()
    model.record_attention(True)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), level=4)
    maps = model.attention_maps()
    assert sorted(maps) == [f"x04_from_x0{k}" for k in range(4)]
    assert all(m.shape == (1, 1, 32, 32) for m in maps.values())


SATURATED = torch.tensor([-float("inf"), 0.0, float("inf")] * 2).view(1, 1, 2, 3)
TRUTH = torch.tensor([0, 0, 0, 1, 1, 1]).view(1, 2, 3)


@pytest.mark.parametrize("mode", ["recommended", "literal"])
def test_hybrid_loss_is_finite_for_predictions_0_half_and_1(mode):
    logits = SATURATED.clone().requires_grad_()
    loss = create_loss("anunet_hybrid", mode=mode)(logits, TRUTH)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_hybrid_dice_term_has_the_squared_denominator_of_eq_8():
    # p = 0.5 on a positive and a negative pixel, s = 1: Eq. 8's Dice (2 * 0.5 + 1) / (0.25 + 0.25 + 1 + 1) = 0.8
    # (the linear form would give 2 / 3); focal: alpha_t 0.25 and 0.75, (1 - 0.5)^2 ln 2 each, mean over 2 pixels
    logits, truth = torch.zeros(1, 1, 1, 2), torch.tensor([[[1, 0]]])
    expected = (1 - 0.8) + (0.25 + 0.75) * 0.25 * math.log(2) / 2
    assert create_loss("anunet_hybrid")(logits, truth).item() == pytest.approx(expected, abs=1e-6)
    literal = 1 - (0.25 * math.log(0.5) / 0.05**2 / 2 + 0.8)  # |p - 0.5| clamped at 0.05
    assert create_loss("anunet_hybrid", mode="literal")(logits, truth).item() == pytest.approx(literal, rel=1e-5)


def test_recommended_hybrid_is_soft_dice_plus_focal():
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    truth = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    p, g = torch.sigmoid(logits), truth.unsqueeze(1).float()
    dice = (2 * (p * g).sum() + 1) / ((p * p).sum() + (g * g).sum() + 1)
    expected = (1 - dice) + sigmoid_focal_loss(logits, g, alpha=0.25, gamma=2.0, reduction="mean")
    assert torch.allclose(create_loss("anunet_hybrid")(logits, truth), expected, atol=1e-6)
    literal = create_loss("anunet_hybrid", mode="literal")(logits, truth)
    log_p = p.clamp(min=1e-6).log()
    assert torch.allclose(literal, 1 - ((0.25 * g * log_p / (p - 0.5).abs().clamp(min=0.05) ** 2).mean() + dice),
                          atol=1e-6)
