"""Fovea Pooling, the variable-radius skip pooling of Fovea-UNet (Liu et al., "Fovea-UNet: detection and
segmentation of lymph node metastases in colorectal cancer with deep learning", BioMedical Engineering OnLine
2023, section "Fovea pooling", Eq. 6-8): every pixel k of a feature map X is pooled over a centred square window
whose size depends on an importance map Z in [0, 1]:

    rho_k = clamp(exp(varsigma (1 - Z_k)), 1, R),   r_k = floor(rho_k),   window side 2 r_k - 1,

so an important pixel (Z = 1) keeps its own value (r = 1) and an unimportant one is pooled over up to
(2R - 1)^2 pixels. varsigma = ln(R) with R = floor(s * W) for the stage's boundary s and width W (the paper's
"Effect of different pooling boundaries"). Stride 1, reflect padding (replicate when the map is too small to
reflect by R - 1); the window side 2r - 1 and the padding are ours (the paper gives neither).

Cost does not grow with the radius: box sums come from one summed-area table (integral image) read with four
gathers per pixel, O(C H W) for any R. The table is accumulated in float64, because float32 prefix sums lose
precision on large maps (we measured 2.8e-4 on a 20x24 map).

The paper is silent on how the importance module learns through floor(); ours is a soft radius, the default:
out = (1 - f) Pool_{r0} + f Pool_{r0 + 1} with r0 = floor(rho), f = rho - r0, so d out / d Z is non-zero.
`hard=True` pools with r0 only (pure Eq. 6).

Aggregations (paper Table 4): `avg` (mean of the window), `lp` (Hyvarinen-Koster energy pooling,
(mean |x|^p + eps)^(1/p), p = 2 by default), `mixed` (lambda Max + (1 - lambda) Avg with lambda =
sigmoid(theta), theta learnable, 0 at start; our form, since the paper's reference for mixed pooling is
mis-cited), `identity` (no pooling, the ablation). Max pooling alone is not offered, as in the paper.

`fovea_pool_loop` is Eq. 6-7 read literally, a loop over pixels: the reference `fovea_pool` is tested and
timed against (`medseg benchmark fovea-pool`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

AGGREGATIONS = ("avg", "lp", "mixed", "identity")


def fovea_max_radius(boundary: float, width: int) -> int:
    """R = floor(s * W), at least 1 (the paper's R_i = floor(e^varsigma_i) = floor(s_i w_i))."""
    return max(1, int(math.floor(boundary * width + 1e-9)))


def fovea_radius(importance: torch.Tensor, max_radius: int) -> torch.Tensor:
    """rho = clamp(exp(ln(R) (1 - Z)), 1, R): the continuous radius of paper Eq. 6 before the floor."""
    varsigma = math.log(max_radius)
    return torch.exp(varsigma * (1 - importance)).clamp(1.0, float(max_radius))


def _pad(x: torch.Tensor, amount: int) -> torch.Tensor:
    if amount == 0:
        return x
    mode = "reflect" if amount < min(x.shape[-2:]) else "replicate"
    return F.pad(x, (amount,) * 4, mode=mode)


class BoxSums:
    """Window sums of a (B, C, H, W) map for per-pixel radii in [1, R], from one float64 summed-area table."""

    def __init__(self, x: torch.Tensor, max_radius: int):
        self.shape = x.shape
        self.max_radius = max_radius
        padded = _pad(x.double(), max_radius - 1)
        table = F.pad(padded.cumsum(-2).cumsum(-1), (1, 0, 1, 0))  # leading zero row and column
        self.table_width = table.shape[-1]
        self.table = table.flatten(-2)
        height, width = x.shape[-2:]
        rows = torch.arange(height, device=x.device).view(1, 1, height, 1) + (max_radius - 1)
        cols = torch.arange(width, device=x.device).view(1, 1, 1, width) + (max_radius - 1)
        self.rows, self.cols = rows, cols

    def mean(self, radius: torch.Tensor) -> torch.Tensor:
        """Mean over the (2r - 1)^2 window centred on each pixel; `radius` is a long (B, 1, H, W) map."""
        top, bottom = self.rows - radius + 1, self.rows + radius  # table rows: [top, bottom) in padded rows
        left, right = self.cols - radius + 1, self.cols + radius
        batch, channels = self.shape[:2]

        def read(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            index = (r * self.table_width + c).flatten(-2).expand(batch, channels, -1)
            return self.table.gather(-1, index)

        total = read(bottom, right) - read(top, right) - read(bottom, left) + read(top, left)
        return total.view(self.shape) / (2 * radius.double() - 1) ** 2


def _window_max_stack(x: torch.Tensor, max_radius: int) -> torch.Tensor:
    """(R, B, C, H, W): entry r - 1 is the max over the (2r - 1)^2 window. Repeated 3x3 max pools; the
    implicit -inf padding gives the same maxima as reflect padding (reflected pixels lie inside the window)."""
    stack = [x]
    for _ in range(max_radius - 1):
        stack.append(F.max_pool2d(stack[-1], 3, stride=1, padding=1))
    return torch.stack(stack)


def _gather_radius(stack: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    index = (radius - 1).unsqueeze(0).expand(1, *stack.shape[1:])
    return stack.gather(0, index).squeeze(0)


def fovea_pool(x: torch.Tensor, importance: torch.Tensor, max_radius: int, aggregation: str = "lp",
               hard: bool = False, p: float = 2.0, eps: float = 1e-6,
               mix: torch.Tensor | None = None) -> torch.Tensor:
    """Fovea Pooling of `x` (B, C, H, W) with importance (B, 1, H, W) in [0, 1] and radii up to `max_radius`.

    `mix` is the max/avg weight lambda in [0, 1] of the `mixed` aggregation (a tensor, so it can learn)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if importance.shape != (x.shape[0], 1, *x.shape[-2:]):
        expected = (x.shape[0], 1, *x.shape[-2:])
        raise ValueError(f"importance must have shape {expected}, got {tuple(importance.shape)}")
    if aggregation == "identity" or max_radius == 1:
        return x
    rho = fovea_radius(importance, max_radius)
    low = rho.detach().floor().long().clamp(1, max_radius)
    radii = [low] if hard else [low, (low + 1).clamp(max=max_radius)]

    if aggregation == "lp":
        sums = BoxSums(x.abs() ** p, max_radius)
        pooled = [(sums.mean(r) + eps) ** (1.0 / p) for r in radii]
    elif aggregation == "avg":
        sums = BoxSums(x, max_radius)
        pooled = [sums.mean(r) for r in radii]
    else:  # mixed
        if mix is None:
            raise ValueError("the mixed aggregation needs the max/avg weight `mix`")
        sums, maxima = BoxSums(x, max_radius), _window_max_stack(x, max_radius)
        pooled = [mix * _gather_radius(maxima, r).double() + (1 - mix) * sums.mean(r) for r in radii]

    if hard:
        return pooled[0].to(x.dtype)
    fraction = (rho.double() - low.double())
    return ((1 - fraction) * pooled[0] + fraction * pooled[1]).to(x.dtype)


class FoveaPooling(nn.Module):
    """Fovea Pooling of one skip connection: `forward(x, importance)`; R = floor(boundary * width of x)."""

    def __init__(self, boundary: float, aggregation: str = "lp", hard: bool = False, p: float = 2.0):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.boundary, self.aggregation, self.hard, self.p = boundary, aggregation, hard, p
        # mixed: lambda = sigmoid(theta), theta_0 = 0 (ours)
        self.theta = nn.Parameter(torch.zeros(())) if aggregation == "mixed" else None

    def forward(self, x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        # an fp32 island under autocast: powers, window sums and gathers of bf16 values lose too much
        with torch.autocast(x.device.type, enabled=False):
            mix = torch.sigmoid(self.theta.float()) if self.theta is not None else None
            pooled = fovea_pool(x.float(), importance.float(), fovea_max_radius(self.boundary, x.shape[-1]),
                                self.aggregation, self.hard, self.p, mix=mix)
        return pooled.to(x.dtype)

    def extra_repr(self) -> str:
        return f"boundary={self.boundary}, aggregation={self.aggregation}, hard={self.hard}"


def fovea_pool_loop(x: torch.Tensor, importance: torch.Tensor, max_radius: int, aggregation: str = "avg",
                    hard: bool = True, p: float = 2.0, eps: float = 1e-6, mix: float = 0.5) -> torch.Tensor:
    """Paper Eq. 6-7 read literally: a loop over pixels that cuts each window out of the padded map. The
    definition `fovea_pool` is checked against (tests) and timed against (`medseg benchmark fovea-pool`)."""
    padded = _pad(x.double(), max_radius - 1)
    rho = fovea_radius(importance.double(), max_radius)[:, 0]
    out = torch.zeros_like(x, dtype=torch.float64)
    offset = max_radius - 1
    for n in range(x.shape[0]):
        for y in range(x.shape[2]):
            for col in range(x.shape[3]):
                low = int(rho[n, y, col].floor())
                fraction = float(rho[n, y, col]) - low
                radii = [(low, 1.0)] if hard else [(low, 1 - fraction), (min(low + 1, max_radius), fraction)]
                for r, weight in radii:
                    window = padded[n, :, y + offset - r + 1:y + offset + r, col + offset - r + 1:col + offset + r]
                    if aggregation == "avg":
                        value = window.mean(dim=(-2, -1))
                    elif aggregation == "lp":
                        value = (window.abs().pow(p).mean(dim=(-2, -1)) + eps) ** (1 / p)
                    else:
                        value = mix * window.amax(dim=(-2, -1)) + (1 - mix) * window.mean(dim=(-2, -1))
                    out[n, :, y, col] += weight * value
    return out.to(x.dtype)
