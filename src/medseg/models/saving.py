"""Model folders: `config.json` + `model.safetensors` (smp-style save_pretrained / from_pretrained).

No pickle anywhere: the network is rebuilt from the registry with the stored name and options, then the
weights are loaded from safetensors. Non-persistent buffers (fixed filters) and anything outside the
module's state_dict are never written. `config.json` also carries the preprocessing the network was
trained with, so predict and evaluate need nothing but this folder. (Initialising a network from a local
file for training, `encoder_weights` or a recipe's `model.weights`, is `medseg.models.pretrained`.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from medseg.errors import MedsegError
from medseg.files import atomic_folder
from medseg.models.base import SegmentationNetwork
from medseg.models.registry import ENCODER_WEIGHTS, create_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
INITIALISATION_OPTIONS = (ENCODER_WEIGHTS,)


def save_model(model: SegmentationNetwork, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `folder/config.json` and `folder/model.safetensors` atomically (a temporary folder, then a rename)."""
    config = model.spec.to_dict()
    folder = Path(folder)
    with atomic_folder(folder, replace=True) as tmp:
        _save_weights(model, str(tmp / WEIGHTS_NAME))
        # Local pretrained-weight paths only initialise a network: the trained weights are in the
        # safetensors file, so a rebuild must not need (or reload) those files.
        kwargs = {k: v for k, v in config["kwargs"].items() if k not in INITIALISATION_OPTIONS}
        payload = {"format": FORMAT_VERSION, **config, "kwargs": kwargs, **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return folder


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a model folder, or of `RUN/model/` when given a run folder."""
    folder = model_folder(path)
    return json.loads((folder / CONFIG_NAME).read_text())


def model_folder(path: str | Path) -> Path:
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise MedsegError(f"no saved model in {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there "
                      f"or in {path / 'model'}; train a run first (`medseg train`)")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationNetwork:
    """Rebuild a saved network (a model folder or a run folder) in eval mode."""
    folder = model_folder(path)
    config = read_model_config(folder)
    model = create_model(config["name"], config["in_channels"], config["num_classes"], **config.get("kwargs", {}))
    missing, unexpected = _load_weights(model, str(folder / WEIGHTS_NAME), strict=False, device=str(map_location))
    if missing or unexpected:
        raise MedsegError(f"{folder / WEIGHTS_NAME} does not match network {config['name']!r}: "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.eval()
