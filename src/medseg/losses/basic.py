"""The standard segmentation losses: BCE, cross-entropy, soft Dice, focal.

Activation follows the output: one channel means binary with a sigmoid, C >= 2 channels means
multi-class with a softmax over channels. A loss that only makes sense for one of the two refuses the
other with a clear error (cross-entropy over a single channel would be a silent, constant zero).

Targets: binary losses take masks of shape (B, H, W) or (B, 1, H, W) with values in [0, 1] (soft
masks from bilinear resizing are allowed); multi-class losses take integer labels (B, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from medseg.errors import MedsegError
from medseg.losses.registry import register_loss


def binary_target(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Check a binary pair and return the target as float (B, 1, H, W)."""
    if logits.shape[1] != 1:
        raise MedsegError(f"loss {name!r} is binary (one output channel, sigmoid) but the network has "
                          f"{logits.shape[1]} output channels; use a multi-class loss (ce, dice, focal) "
                          "or set model.num_classes: 1")
    target = target.unsqueeze(1) if target.dim() == 3 else target
    if target.shape[-2:] != logits.shape[-2:] or target.shape[0] != logits.shape[0]:
        raise MedsegError(f"loss {name!r}: target shape {tuple(target.shape)} does not match "
                          f"output {tuple(logits.shape)}")
    if target.numel() and (target.min() < 0 or target.max() > 1):
        raise MedsegError(f"loss {name!r}: binary targets must lie in [0, 1], "
                          f"found values up to {target.max().item():g}; "
                          "for label masks set model.num_classes to the number of classes")
    return target.to(logits.dtype)


def label_target(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Check a multi-class pair and return the labels as long (B, H, W)."""
    classes = logits.shape[1]
    if classes < 2:
        raise MedsegError(f"loss {name!r} needs a multi-class output (>= 2 channels, softmax) but the network has one "
                          "channel; use bce/dice/focal on a binary output or set model.num_classes >= 2")
    target = target.squeeze(1) if target.dim() == 4 else target
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise MedsegError(f"loss {name!r}: multi-class targets must be integer labels, got fractional values")
    target = target.long()
    if target.numel() and (target.min() < 0 or target.max() >= classes):
        raise MedsegError(f"loss {name!r}: labels must lie in [0, {classes - 1}], found {target.max().item()}; "
                          "check model.num_classes against the masks")
    return target


def class_probabilities(name: str, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, one-hot target), both (B, K, H, W): K = 1 for binary, C for multi-class."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits), binary_target(name, logits, target)
    labels = label_target(name, logits, target)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
    return logits.softmax(dim=1), one_hot


@register_loss("bce")
class BCELoss(nn.Module):
    """Binary cross-entropy on logits, mean over pixels; optional `pos_weight` for rare foreground."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = binary_target("bce", logits, target)
        pos_weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


@register_loss("ce")
class CrossEntropyLoss(nn.Module):
    """Softmax cross-entropy over C >= 2 classes (STS-Net's two-class head), mean over pixels."""

    def __init__(self, class_weights: list[float] | None = None):
        super().__init__()
        self.class_weights = class_weights

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels = label_target("ce", logits, target)
        weight = None if self.class_weights is None else logits.new_tensor(self.class_weights)
        return F.cross_entropy(logits, labels, weight=weight)


@register_loss("dice")
class DiceLoss(nn.Module):
    """Soft Dice loss 1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth).

    `per_image=True` computes the ratio per image and averages over the batch (FocusNet's reference
    code); `per_image=False` sums over the whole batch first (one Dice for the batch). `squared=True`
    uses p^2 and g^2 in the denominator (Milletari's V-Net form, used by ANU-Net). Multi-class:
    softmax, one ratio per class, averaged over the foreground classes unless `include_background`.
    """

    def __init__(self, smooth: float = 1.0, per_image: bool = True, squared: bool = False,
                 include_background: bool = False):
        super().__init__()
        self.smooth = smooth
        self.per_image = per_image
        self.squared = squared
        self.include_background = include_background

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs, truth = class_probabilities("dice", logits, target)
        dims = (2, 3) if self.per_image else (0, 2, 3)
        intersection = (probs * truth).sum(dims)
        if self.squared:
            denominator = (probs * probs).sum(dims) + (truth * truth).sum(dims)
        else:
            denominator = probs.sum(dims) + truth.sum(dims)
        dice = (2 * intersection + self.smooth) / (denominator + self.smooth)  # (B, K) or (K,)
        if logits.shape[1] > 1 and not self.include_background:
            dice = dice[..., 1:]
        return 1 - dice.mean()


@register_loss("focal")
class FocalLoss(nn.Module):
    """Focal loss -alpha_t (1 - p_t)^gamma log p_t (Lin et al., RetinaNet, ICCV 2017), mean over pixels.

    Binary: torchvision's sigmoid_focal_loss (alpha weights positives, 1 - alpha negatives; alpha=None
    disables it). Multi-class: softmax form, `alpha` (if given) scales every class equally.
    """

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            target = binary_target("focal", logits, target)
            return sigmoid_focal_loss(logits, target, alpha=-1 if self.alpha is None else self.alpha,
                                      gamma=self.gamma, reduction="mean")
        labels = label_target("focal", logits, target)
        log_pt = F.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_pt.exp()) ** self.gamma) * log_pt
        return (loss * (1.0 if self.alpha is None else self.alpha)).mean()
