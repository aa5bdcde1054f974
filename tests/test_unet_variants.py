import pytest
import torch

import medseg
from medseg.models.blocks import AttentionGate


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("attention_unet", 34_878_573), ("r2unet", 39_091_393),
                                           ("r2attunet", 39_442_925)])
def test_parameter_counts_of_the_reference_forms(name, expected):
    assert n_params(medseg.create_model(name, in_channels=3, num_classes=1)) == expected


@pytest.mark.parametrize("name", ["attention_unet", "r2unet", "r2attunet"])
def test_forward_gives_logits_at_input_size(name):
    model = medseg.create_model(name, 1, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 48)).shape == (1, 2, 32, 48)


def test_attention_gate_scales_the_skip_by_one_coefficient_per_pixel():
    torch.manual_seed(0)
    gate = AttentionGate(8, 4, 2).eval()
    gating, skip = torch.randn(2, 8, 5, 5), torch.randn(2, 4, 5, 5)
    gate.keep_coefficients = True
    out = gate(gating, skip)
    alpha = gate.last_coefficients
    assert alpha.shape == (2, 1, 5, 5) and 0 <= alpha.min() and alpha.max() <= 1
    assert torch.allclose(out, skip * alpha)
    expected = torch.sigmoid(gate.coefficient[1](gate.coefficient[0](torch.relu(gate.gate(gating) + gate.skip(skip)))))
    assert torch.allclose(alpha, expected)


def test_recorded_attention_maps_of_the_first_layer():
    model = medseg.create_model("attention_unet", 3, 1).eval()
    model.record_attention(True)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    maps = model.attention_maps()
    assert list(maps) == ["gate_level0"] and maps["gate_level0"].shape == (2, 1, 32, 32)
    assert medseg.create_model("r2unet", 3, 1).first_layer_gates() == {}
