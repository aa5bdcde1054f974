"""`medseg analyze cka`: how alike the channels of one layer are (Fovea-UNet, seed 000, Fig. 5).

Each channel i of the layer is a matrix X_i (images x spatial positions), collected over the data's images
at the run's preprocessing. Linear CKA (Kornblith et al. 2019), the paper's similarity: with K_i = X_i X_i^T
centred over the images, CKA(i, j) = <K_i, K_j>_F / (|K_i|_F |K_j|_F), all pairs from one Gram matrix of
the flattened K_i. The m x m matrix is written as a heat map PNG (viridis, 0 = dark blue, 1 = yellow;
channels constant over the images have no CKA: NaN, drawn black) and as the numbers in a .npy beside it;
the mean off-diagonal CKA is returned (what nHSIC drives down).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.data.dataset import InferenceDataset, collate_inference
from medseg.data.formats import discover
from medseg.data.io import write_image_atomic
from medseg.engine.inference import Predictor, heat_map
from medseg.errors import MedsegError


def intrinsic_layers(model: nn.Module) -> list[str]:
    """Names of the Ghost modules' primary convs (the intrinsic features), the layers Fig. 5 shows."""
    return [f"{name}.primary_conv" for name, m in model.named_modules() if type(m).__name__ == "GhostModule"]


def linear_cka_matrix(features: torch.Tensor) -> torch.Tensor:
    """(N images, C, H, W) -> (C, C) linear CKA between channels, each channel an N x HW matrix."""
    x = features.double().transpose(0, 1).flatten(2)  # (C, N, HW)
    gram = x @ x.transpose(1, 2)  # (C, N, N)
    n = gram.shape[-1]
    centring = torch.eye(n, dtype=gram.dtype) - 1.0 / n
    gram = centring @ gram @ centring
    flat = gram.flatten(1)
    norms = flat.norm(dim=1)
    matrix = (flat @ flat.T) / (norms[:, None] * norms[None, :]).clamp(min=1e-300)
    dead = norms <= 1e-12 * norms.max().clamp(min=1e-300)  # constant over the images (e.g. all zero after ReLU)
    matrix[dead, :] = float("nan")
    matrix[:, dead] = float("nan")
    return matrix


def cka(run: str | Path, data: str | Path, layer: str | None = None, out: str | Path | None = None,
        images: int = 32, device: str = "auto", cell: int = 8) -> tuple[Path, float]:
    predictor = Predictor(run, device)
    model = predictor.model.eval()
    modules = dict(model.named_modules())
    layer = layer or next(iter(intrinsic_layers(model)), None)
    if layer not in modules:
        suggestions = intrinsic_layers(model)[:6] or [n for n in modules if n][:6]
        raise MedsegError(f"layer {layer!r} is not in the network {predictor.config['name']!r}; "
                          f"try one of {', '.join(suggestions)} (module names of the network)")
    cases = discover(Path(data)).cases[:images]
    if len(cases) < 2:
        raise MedsegError(f"{data}: CKA needs at least 2 images; found {len(cases)}")
    dataset = InferenceDataset(cases, predictor.preprocessing, with_masks=False)
    captured: list[torch.Tensor] = []
    handle = modules[layer].register_forward_hook(lambda m, i, o: captured.append(o.detach().float().cpu()))
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_inference)
        with torch.no_grad():
            for batch in loader:
                predictor.probabilities(batch["image"])
    finally:
        handle.remove()
    features = torch.cat(captured)
    if features.dim() != 4:
        raise MedsegError(f"layer {layer!r} gives {tuple(features.shape[1:])} outputs; choose a convolutional layer")
    matrix = linear_cka_matrix(features)
    off_diagonal = matrix[~torch.eye(len(matrix), dtype=torch.bool)]
    mean = float(off_diagonal.nanmean()) if off_diagonal.numel() else 1.0
    target = Path(out) if out else Path(run) / "analysis" / f"cka-{layer}.png"
    cell = max(cell, 256 // len(matrix))  # at least about 256 px wide
    picture = heat_map(matrix.float()).repeat(cell, axis=0).repeat(cell, axis=1)
    write_image_atomic(target, picture)
    numbers = target.with_suffix(".npy")
    temporary = numbers.with_name(f".{numbers.name}.tmp.npy")
    np.save(temporary, matrix.numpy())
    temporary.replace(numbers)
    return target, mean
