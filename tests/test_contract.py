"""The network contract (medseg.models.base): every registered network is bound to its spec and card, has
its input size checked, names its parameter groups, and declares its capabilities as classes."""

import pytest
import torch
from torch import nn

import medseg
from medseg.models import model_info, save_model
from medseg.models.base import (
    ExtraLosses,
    Gated,
    KernelRegularised,
    NamedFeatureLayers,
    NetworkCard,
    Prunable,
    SegmentationNetwork,
)
from medseg.models.registry import register_model

# Small configurations so every family builds in a moment.
SMALL = {"unet": {"base_channels": 4}, "fovea_unet": {"decoder_widths": (16, 8, 8, 8)}}
CAPABILITIES = {
    "anunet": {Prunable, Gated}, "unetpp": {Prunable, Gated}, "attention_unet": {Gated}, "r2unet": {Gated},
    "r2attunet": {Gated}, "fovea_unet": {ExtraLosses, NamedFeatureLayers}, "focusnet": {KernelRegularised},
}
ALL = (Prunable, Gated, ExtraLosses, KernelRegularised, NamedFeatureLayers)
LIGHT = ["unet", "anunet", "unetpp", "attention_unet", "r2unet", "r2attunet", "fovea_unet", "focusnet", "msnet"]


@pytest.mark.parametrize("name", LIGHT)
def test_every_network_is_bound_and_declares_its_capabilities(name):
    model = medseg.create_model(name, 3, 1, **SMALL.get(name, {}))
    info = model_info(name)
    assert isinstance(model, SegmentationNetwork)
    assert model.spec.name == name and model.spec.options == SMALL.get(name, {})
    assert model.card == info.card and info.card.paper and info.card.size_multiple > 1
    assert {c for c in ALL if isinstance(model, c)} == CAPABILITIES.get(name, set())
    groups = model.param_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(groups.values()), f"{name}: an empty parameter group {[g for g, p in groups.items() if not p]}"
    multiple = info.card.size_multiple
    with pytest.raises(ValueError, match=f"multiples of {multiple}"):
        model(torch.randn(1, 3, multiple * 4 + 2, multiple * 4))


def test_papers_are_named_by_title_and_venue():
    for name in medseg.list_models():
        paper = model_info(name).paper
        assert "seed" not in paper and len(paper) > 40, (name, paper)


def test_pruning_builds_a_new_network_whose_spec_is_right(tmp_path):
    full = medseg.create_model("anunet", 3, 1).eval()
    pruned = full.prune(2)
    assert pruned is not full and full.level == 4  # the full network is left as it was
    assert pruned.spec.options == {"level": 2, "pruned": True} and sorted(pruned.heads) == ["y2"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(full(x, level=2), pruned(x))
    reloaded = medseg.load_model(save_model(pruned, tmp_path / "model"))
    assert reloaded.spec.options == {"level": 2, "pruned": True}
    with pytest.raises(medseg.errors.MedsegError, match="cannot prune to level 3"):
        pruned.prune(3)


def test_a_network_outside_the_contract_is_not_registered():
    with pytest.raises(TypeError, match="must subclass"):
        register_model("plain_module", NetworkCard(paper="x", size_multiple=1, default_size=8))(nn.Conv2d)


def test_a_capability_without_its_method_cannot_be_built():
    class Forgetful(ExtraLosses, SegmentationNetwork):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="abstract"):
        Forgetful()


def test_a_network_built_outside_create_model_says_so():
    from medseg.models.unet import UNet

    with pytest.raises(RuntimeError, match="create_model"):
        UNet(3, 1, base_channels=4).spec
