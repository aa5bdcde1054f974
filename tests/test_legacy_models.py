"""Model folders written before the network contract (format 1, by the main of 2026-11-30) still load and
predict identically. The fixtures hold each folder's config.json, its tensor names / shapes and the
probabilities the old code predicted; the weights are regenerated here from a seed (no weights in git)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medseg.engine.inference import Predictor
from medseg.models import load_model

FIXTURES = Path(__file__).parent / "fixtures" / "legacy_models"


def seeded_weights(shapes: dict[str, list[int]], dtypes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors the fixture script wrote: N(0, 0.2) in sorted name order, running_var U(0.5, 1.5)."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key in sorted(shapes):
        dtype = getattr(torch, dtypes[key].removeprefix("torch."))
        if not dtype.is_floating_point:
            state[key] = torch.zeros(shapes[key], dtype=dtype)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shapes[key], generator=generator) + 0.5
        else:
            state[key] = torch.randn(shapes[key], generator=generator) * 0.2
    return state


def legacy_folder(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / name / "config.json", folder / "config.json")
    tensors = json.loads((FIXTURES / name / "tensors.json").read_text())
    save_file(seeded_weights(tensors["shapes"], tensors["dtypes"]), str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("name", ["unet", "anunet_l2", "fovea_unet"])
def test_a_model_folder_of_the_old_format_predicts_as_before(name, tmp_path):
    folder = legacy_folder(name, tmp_path)
    images = torch.from_numpy(np.load(FIXTURES / "input.npy"))
    expected = np.load(FIXTURES / name / "expected_probabilities.npy")
    probabilities = Predictor(folder, "cpu", precision="32").probabilities(images).numpy()  # fp32 as recorded
    assert probabilities.shape == expected.shape
    np.testing.assert_allclose(probabilities, expected, atol=2e-5)


def test_a_pruned_legacy_folder_rebuilds_pruned(tmp_path):
    model = load_model(legacy_folder("anunet_l2", tmp_path))
    assert model.level == 2 and sorted(model.heads) == ["y2"]
