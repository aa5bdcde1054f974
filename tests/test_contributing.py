"""CONTRIBUTING.md's steps for adding a network, run exactly as written: its model file and recipe are taken
from the document, registered, trained on a few phantom images, saved, reloaded and used for prediction."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import medseg
from medseg.config import load_recipe
from medseg.engine.inference import Predictor
from medseg.models import registry

DOCUMENT = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"
BLOCK = re.compile(r'```(\w+) title="([^"]+)"\n(.*?)```', re.S)


def documented_files() -> dict[str, str]:
    return {path: text for _, path, text in BLOCK.findall(DOCUMENT.read_text())}


@pytest.fixture
def tinynet(tmp_path):
    files = documented_files()
    module_file = tmp_path / Path("src/medseg/models/tinynet.py").name
    module_file.write_text(files["src/medseg/models/tinynet.py"])
    recipe_file = tmp_path / "tinynet.yaml"
    recipe_file.write_text(files["src/medseg/recipes/tinynet.yaml"])
    spec = importlib.util.spec_from_file_location("medseg_contributing_tinynet", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield recipe_file
    registry._REGISTRY.pop("tinynet", None)  # noqa: SLF001  (leave the registry as the package defines it)
    sys.modules.pop(spec.name, None)


def test_the_document_holds_a_model_file_and_a_recipe():
    assert set(documented_files()) == {"src/medseg/models/tinynet.py", "src/medseg/recipes/tinynet.yaml"}


def test_a_network_added_by_the_documented_steps_trains_and_predicts(tinynet, phantom, tmp_path):
    assert "tinynet" in medseg.list_models()
    model = medseg.create_model("tinynet", 1, 2, width=4)
    assert model.card.size_multiple == 2 and model.spec.options == {"width": 4}
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 2, 32, 32)
    assert set(model.param_groups()) == {"encoder", "decoder"}

    from medseg.engine.train import train

    run = train(load_recipe(tinynet), phantom, out=tmp_path / "runs", progress=False)
    assert (run.model_dir / "model.safetensors").is_file()
    predictor = Predictor(run.path, "cpu")
    probabilities = predictor.probabilities(torch.randn(1, 3, 64, 64))
    assert probabilities.shape == (1, 1, 64, 64) and bool(((probabilities >= 0) & (probabilities <= 1)).all())
