"""Model folders: `config.json` + `model.safetensors` (smp-style save_pretrained / from_pretrained).

No pickle anywhere: the network is rebuilt from the registry with the stored name and options, then the
weights are loaded from safetensors. Non-persistent buffers (fixed filters) and anything outside the
module's state_dict are never written. `config.json` also carries the preprocessing the network was
trained with, so predict and evaluate need nothing but this folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights
from torch import nn

from medseg.errors import MedsegError
from medseg.models.registry import create_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def save_model(model: nn.Module, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `folder/config.json` and `folder/model.safetensors` atomically (a temporary folder, then a rename)."""
    config = getattr(model, "medseg_config", None)
    if config is None:
        raise ValueError("save_model needs a network built by medseg.create_model (it carries medseg_config)")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _save_weights(model, str(tmp / WEIGHTS_NAME))
        payload = {"format": FORMAT_VERSION, **config, **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
    raise MedsegError(f"no saved model in {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there or in {path / 'model'}; "
                      "train a run first (`medseg train`)")


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved network (a model folder or a run folder) in eval mode."""
    folder = model_folder(path)
    config = read_model_config(folder)
    model = create_model(config["name"], config["in_channels"], config["num_classes"], **config.get("kwargs", {}))
    missing, unexpected = _load_weights(model, str(folder / WEIGHTS_NAME), strict=False, device=str(map_location))
    if missing or unexpected:
        raise MedsegError(f"{folder / WEIGHTS_NAME} does not match network {config['name']!r}: "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def load_weights_file(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Initialise `model` from a local weights file (.safetensors, or a .pt/.pth state dict read without pickle).

    Tensors whose name and shape match are loaded; the rest are reported, so a user can see at once
    whether the file fits. Returns {"loaded", "missing", "unexpected", "mismatched"} name lists.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"weights file {path} does not exist; give a local .safetensors or .pth file (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any unreadable file is the user's input error)
            raise MedsegError(f"cannot read weights file {path}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise MedsegError(f"weights file {path} does not hold a state dict")
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    report = {
        "loaded": sorted(matched),
        "missing": sorted(k for k in own if k not in matched),
        "unexpected": sorted(k for k in state if k not in own),
        "mismatched": sorted(k for k in state if k in own and own[k].shape != state[k].shape),
    }
    if not matched:
        raise MedsegError(f"no tensor in {path} matches the network by name and shape; is it the right file?")
    model.load_state_dict(matched, strict=False)
    return report
