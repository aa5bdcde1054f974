"""Edge distance of layered structures (OCT retinal layers): the mean Euclidean distance (MED) that GOALS 2022
reports beside Dice, as M2SNet's Table 5 does (arXiv:2303.10894, Sec. 4.2: "the Dice coefficient and
mean Euclidean distance (MED) to evaluate segmentation bodies and edges").

The paper gives no formula and the challenge's scoring code is not available to us, so the definition is ours, the
usual OCT boundary error: a layer (class k) has an upper edge (its first row) and a lower edge (its last row + 1)
in every A-scan (image column) that holds it. In each column where both the prediction and the reference hold the
layer, each edge of the prediction is paired with the same edge of the reference in that column, so their
Euclidean distance is the row difference. MED_k of an image is the mean of these distances over both edges and
all paired columns, in pixels of the mask's own size. Columns where only one side holds the layer have no pair
and are left out (Dice counts them); an image with no paired column has MED NaN.
"""

from __future__ import annotations

import math

import torch

MED_DEFINITION = ("per layer: |row difference| of its upper and lower edges between prediction (argmax) and "
                  "reference in every image column where both hold the layer, mean over both edges and those "
                  "columns, in pixels; NaN when no column holds the layer in both")


def layer_edges(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(upper edge row, lower edge row, present) per column of the label map (H, W) for class k, each (W,)."""
    layer = labels == k
    present = layer.any(dim=0)
    top = layer.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximum: the first row of the layer
    bottom = layer.shape[0] - layer.flip(0).to(torch.uint8).argmax(dim=0)
    return top, bottom, present


def layer_distances(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list[float]:
    """MED of the classes 1..num_classes-1 for one image: label maps (H, W) of prediction and reference."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(truth.shape)} differ in shape")
    out = []
    for k in range(1, max(2, num_classes)):
        top_p, bottom_p, in_p = layer_edges(pred, k)
        top_t, bottom_t, in_t = layer_edges(truth, k)
        paired = in_p & in_t
        if not paired.any():
            out.append(math.nan)
            continue
        distance = ((top_p - top_t).abs() + (bottom_p - bottom_t).abs()).double()[paired] / 2
        out.append(float(distance.mean()))
    return out
