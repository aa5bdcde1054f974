"""UM-Net's uncertainty-weighted loss (Du et al., "UM-Net: Rethinking ICGNet for polyp segmentation with uncertainty
modeling", Medical Image Analysis 99, 103347, 2025), registered as `umnet_uncertainty`.

The paper's text was not readable offline; the loss is pinned down from the training code of the network's earlier
name, umICGNet (chip-xu/umICGNet: utils/loss.py `Deep_Loss`, train.py in the repository's history; its network file
is dxqllp/UM-Net's UM-Net.py apart from the class name and the contour head's kernel). Per output, with p = sigmoid:

- S = (BCE + Dice) / 2, the code's `structure_loss`: BCE a plain mean over the batch's pixels, Dice per image
  (smooth 1) averaged over the batch;
- v = log(1 + (p - g)^2), a per-pixel "variance" that is large where the prediction is wrong;
- L = S * mean(exp(-v)) + mean(v) (the code's `torch.mean(loss * exp_variance) + torch.mean(variance)` with S a
  scalar). Nothing is detached: v is part of the objective, as in the code.

The code averages L over its five maps (main, 1/2, 1/4, 1/8, 1/16: deep-supervision weights 0.2 each in a recipe)
and adds, weight 1, a focal loss between Sobel edges of its contour output and of the mask: that term is the
network's own (medseg.models.umnet `extra_losses`, "contour" in a recipe's `train.extra_loss_weights`), as it needs
the contour output the segmentation losses do not see. The code resizes the mask bilinearly (soft targets) for the
side outputs; medseg's deep-supervision wrapper resizes it nearest (ours).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.losses.basic import BCELoss, DiceLoss, binary_target
from medseg.losses.registry import register_loss


@register_loss("umnet_uncertainty")
class UMNetUncertaintyLoss(nn.Module):
    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.bce, self.dice = BCELoss(), DiceLoss(smooth=smooth, per_image=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        truth = binary_target("umnet_uncertainty", logits, target)
        variance = torch.log1p((torch.sigmoid(logits) - truth) ** 2)
        structure = (self.bce(logits, truth) + self.dice(logits, truth)) / 2
        return structure * torch.exp(-variance).mean() + variance.mean()
