"""ANU-Net's hybrid loss (Li et al., Computers & Graphics 2020, Sec. 3.4, Eq. 8), registered as
`anunet_hybrid`.

Per output (the deep-supervision wrapper sums it over the four heads, weights 1 by default):

- The Dice term, in both modes, is Eq. 8's: D = (2 sum(p g) + s) / (sum(p^2) + sum(g^2) + s), the
  denominator squared as printed in Eq. 8 ("Y_i^2 + Ybar^2 + s") and in Eq. 5 ("Ybar^2 + Y^2"); the pixel
  sums run over the whole batch (Eq. 8 has no per-image split). For 0/1 masks g^2 = g, so it differs from
  the linear soft Dice (sum(p) + sum(g) in the denominator) only through sum(p^2) <= sum(p). No code by the
  ANU-Net authors was found, so nothing backs the linear form here; the `dice` loss offers it.
- `mode: recommended` (default) - what the text describes ("soft dice + focal + BCE"):
  L = (1 - D) + mean_pixels[-alpha_t (1 - p_t)^gamma log p_t], the RetinaNet focal term (alpha_t = alpha
  for positives, 1 - alpha for negatives; gamma = 2, alpha = 0.25, s = 1).
- `mode: literal` - Eq. 8 as printed: L = 1 - [alpha g log p / |p - 0.5|^gamma + D], the first term a
  mean over pixels. As printed it only penalises positive pixels and is unbounded at p = 0.5 and p = 0,
  so two documented clamps keep it finite: |p - 0.5| >= 0.05 and p >= 1e-6. Not recommended.

Both modes work on probabilities clamped away from 0 and 1 (1e-6) rather than on BCE-with-logits, so
the loss stays finite for saturated outputs (logits of +-inf, probabilities exactly 0 or 1).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.losses.basic import binary_target
from medseg.losses.registry import register_loss

PROBABILITY_FLOOR = 1e-6
DISTANCE_FLOOR = 0.05  # literal mode: |p - 0.5| >= 0.05


@register_loss("anunet_hybrid")
class ANUNetHybridLoss(nn.Module):
    def __init__(self, mode: Literal["recommended", "literal"] = "recommended", alpha: float = 0.25,
                 gamma: float = 2.0, smooth: float = 1.0):
        super().__init__()
        if mode not in ("recommended", "literal"):
            raise MedsegError(f"anunet_hybrid mode must be 'recommended' or 'literal', got {mode!r}")
        self.mode, self.alpha, self.gamma, self.smooth = mode, alpha, gamma, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        truth = binary_target("anunet_hybrid", logits, target)
        probs = torch.sigmoid(logits.float())
        # Eq. 8: squared denominator, sums over the batch's pixels
        dice = (2 * (probs * truth).sum() + self.smooth) / ((probs * probs).sum() + (truth * truth).sum() + self.smooth)
        if self.mode == "literal":
            log_p = probs.clamp(min=PROBABILITY_FLOOR).log()
            distance = (probs - 0.5).abs().clamp(min=DISTANCE_FLOOR)
            return 1 - ((self.alpha * truth * log_p / distance**self.gamma).mean() + dice)
        p_t = torch.where(truth > 0.5, probs, 1 - probs).clamp(PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR)
        alpha_t = torch.where(truth > 0.5, torch.full_like(probs, self.alpha), torch.full_like(probs, 1 - self.alpha))
        focal = -(alpha_t * (1 - p_t) ** self.gamma * p_t.log()).mean()
        return (1 - dice) + focal
