"""`medseg analyze cka`: how alike the channels of one layer of a trained network are, for any network and any
layer with (B, C, H, W) outputs. The analysis is Fovea-UNet's Fig. 5 (Liu et al., "Fovea-UNet: detection and
segmentation of lymph node metastases in colorectal cancer with deep learning", BioMedical Engineering OnLine
2023, "Effectiveness of HSIC regularization"); a network that names its analysed layers (`NamedFeatureLayers`,
e.g. Fovea-UNet's Ghost-module intrinsic features) gives the default layer, any other needs `--layer`.

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
from medseg.files import atomic_file, check_output_file
from medseg.models.base import NamedFeatureLayers


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the network's conv layers, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def choose_layer(model: nn.Module, network: str, layer: str | None) -> str:
    """`layer`, checked to be a module of the network; without it, the first layer the network names."""
    named = model.analysis_layers() if isinstance(model, NamedFeatureLayers) else []
    if layer is None and named:
        return named[0]
    if layer and layer in dict(model.named_modules()):
        return layer
    convs = conv_layers(model)
    listing = (f"one of the layers it names: {', '.join(named[:6])}" if named
               else f"one of its {len(convs)} conv layers, e.g. {', '.join(convs[:3] + convs[3:][-3:])}")
    if layer is None:
        raise MedsegError(f"network {network!r} names no default layer to analyse; give --layer, {listing}")
    raise MedsegError(f"layer {layer!r} is not in the network {network!r}; try {listing}")


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
    if out:
        check_output_file(out, "--out")
    predictor = Predictor(run, device)
    model = predictor.model.eval()
    layer = choose_layer(model, predictor.config["name"], layer)
    target = Path(out) if out else Path(run) / "analysis" / f"cka-{layer}.png"
    if not out:  # the default picture in the run folder, checked before the forward passes (--out was above)
        check_output_file(target, "--out")
    cases = discover(Path(data)).cases[:images]
    if len(cases) < 2:
        raise MedsegError(f"{data}: CKA needs at least 2 images; found {len(cases)}")
    dataset = InferenceDataset(cases, predictor.preprocessing, with_masks=False)
    captured: list[torch.Tensor] = []
    calls: list[object] = []  # the layer's outputs in one forward pass (a shared module runs more than once)

    def keep(module: nn.Module, inputs: tuple, output: object) -> None:
        calls.append(output)

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate_inference)
        with torch.no_grad():
            for batch in loader:
                calls.clear()
                predictor.probabilities(batch["image"])
                output = calls[0] if calls else None
                if not isinstance(output, torch.Tensor) or output.dim() != 4:
                    shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else type(output).__name__
                    raise MedsegError(f"layer {layer!r} gives {shape} outputs, not (C, H, W) maps; choose a "
                                      "convolutional layer")
                captured.append(output.detach().float().cpu())
    finally:
        handle.remove()
    features = torch.cat(captured)
    matrix = linear_cka_matrix(features)
    off_diagonal = matrix[~torch.eye(len(matrix), dtype=torch.bool)]
    mean = float(off_diagonal.nanmean()) if off_diagonal.numel() else 1.0
    cell = max(cell, 256 // len(matrix))  # at least about 256 px wide
    picture = heat_map(matrix.float()).repeat(cell, axis=0).repeat(cell, axis=1)
    write_image_atomic(target, picture)
    with atomic_file(target.with_suffix(".npy")) as temporary, temporary.open("wb") as stream:
        np.save(stream, matrix.numpy())
    return target, mean
