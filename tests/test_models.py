import json

import pytest
import torch
from safetensors.torch import load_file

import medseg
from medseg.errors import MedsegError
from medseg.models import model_info, save_model
from medseg.models.pretrained import load_network_weights


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_unet_parameter_count_matches_the_classic_unet():
    assert n_params(medseg.create_model("unet", in_channels=3, num_classes=1)) == 31_037_633


def test_unet_returns_logits_at_input_size():
    torch.manual_seed(0)  # a random init's output is not negative somewhere for every seed
    model = medseg.create_model("unet", 1, 3, base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 48, 80))
    assert out.shape == (2, 3, 48, 80)
    assert out.min() < 0  # logits: no sigmoid or softmax inside the network


def test_unet_rejects_sizes_off_its_multiple():
    model = medseg.create_model("unet", 3, 1, base_channels=4)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 3, 50, 64))


def test_registry_lists_and_describes_models():
    assert "unet" in medseg.list_models()
    info = model_info("unet")
    assert info.size_multiple == 16 and "Ronneberger" in info.paper and info.description


def test_registry_errors_name_the_choices():
    with pytest.raises(MedsegError, match="unknown model 'unet3'; registered models: .*unet"):
        medseg.create_model("unet3")
    with pytest.raises(MedsegError, match="no option depth; its options are: base_channels"):
        medseg.create_model("unet", depth=5)


def test_param_groups_cover_every_parameter_once():
    model = medseg.create_model("unet", 3, 1, base_channels=4)
    groups = model.param_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_save_and_load_roundtrip_without_pickle(tmp_path):
    model = medseg.create_model("unet", 1, 2, base_channels=4).eval()
    folder = save_model(model, tmp_path / "model", extra={"preprocessing": {"size": [32, 32]}})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["name"] == "unet" and config["kwargs"] == {"base_channels": 4} and config["num_classes"] == 2
    assert set(load_file(str(folder / "model.safetensors"))) == set(model.state_dict())
    loaded = medseg.load_model(tmp_path / "model")
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def test_load_model_reports_a_missing_folder(tmp_path):
    with pytest.raises(MedsegError, match="no saved model"):
        medseg.load_model(tmp_path)


def test_weights_file_initialises_the_network_and_reports_the_reinitialised_head(tmp_path):
    source = medseg.create_model("unet", 3, 1, base_channels=4)
    save_model(source, tmp_path / "src")
    target = medseg.create_model("unet", 3, 2, base_channels=4)  # another head: those tensors stay random
    report = load_network_weights(target, tmp_path / "src" / "model.safetensors")
    assert report.reinitialised == ["head.weight", "head.bias"] and report.loaded == len(source.state_dict()) - 2
    assert torch.equal(target.encoder[0][0][0].weight, source.encoder[0][0][0].weight)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    assert load_network_weights(target, tmp_path / "weights.pth").loaded == report.loaded
    assert len(target.load_reports) == 2
    with pytest.raises(MedsegError, match="does not exist"):
        load_network_weights(target, tmp_path / "nope.pth")


def test_the_shipped_catalogue_is_the_registry_table():
    """`medseg models` prints catalogue.json without building networks; it must equal what the registry builds.
    When this fails after a network change: python -m medseg.models.catalogue"""
    from medseg.models.catalogue import CATALOGUE, catalogue_rows, render

    assert CATALOGUE.read_text() == render(catalogue_rows())
