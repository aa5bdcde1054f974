"""Reading local weight files: the one place medseg turns a file on disk into tensors (no downloads, no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from medseg.errors import MedsegError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local .safetensors file or a .pt/.pth state dict (read with weights_only: no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"weights file {path} does not exist; give a local .safetensors or .pth file (nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file is the user's input error)
        raise MedsegError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsegError(f"weights file {path} does not hold a state dict of tensors")
    return state
