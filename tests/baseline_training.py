"""Shared by the baseline tests (tests/test_baselines_*.py): parameter counting, the short CPU training check
of a recipe's network on one tiny batch (with the network's extra losses, weighted as the recipe says), and
the check of an edge output trained against the mask's edges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import medseg
from medseg.config import load_recipe
from medseg.engine.optim import build_optimizer
from medseg.errors import MedsegError
from medseg.losses import build_loss
from medseg.models.base import ExtraLosses
from medseg.models.targets import mask_edges


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def toy_batch(size: int, num_classes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two noisy RGB images, each with a brighter rectangle, and their labels (the rectangle is the last class)."""
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(2, size, size, dtype=torch.long)
    foreground = max(1, num_classes - 1)
    truth[0, size // 8: size // 2, size // 4: 3 * size // 4] = foreground
    truth[1, size // 2: 7 * size // 8, size // 8: size // 2] = foreground
    images = torch.randn(2, 3, size, size, generator=g) + 1.5 * (truth[:, None] > 0).float()  # learnable signal
    return images, truth


def recipe_training_losses(recipe_name: str, size: int, steps: int = 2, optimiser: str = "adam",
                           **options) -> list[float]:
    """The recipe's own loss (with its deep-supervision and extra-loss weights) over a few steps on one tiny batch:
    `optimiser` "adam" at the recipe's lr, or "recipe" for the recipe's optimiser; `options` override model options
    (narrower widths keep the check short on two busy cores)."""
    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    num_classes = recipe.model.num_classes
    model = medseg.create_model(recipe.model.name, 3, num_classes, **{**recipe.model.options(), **options}).train()
    criterion = build_loss(recipe.to_dict()["loss"], recipe.train.deep_supervision_weights)
    optimizer = (build_optimizer(model, recipe.optim) if optimiser == "recipe"
                 else torch.optim.Adam(model.parameters(), lr=recipe.optim.lr))
    return training_losses(model, criterion, optimizer, *toy_batch(size, num_classes), steps,
                           extra_loss_weights=recipe.train.extra_loss_weights)


def training_losses(model: torch.nn.Module, criterion, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    truth: torch.Tensor, steps: int, extra_loss_weights: dict[str, float] | None = None) -> list[float]:
    """The loss at each of `steps` optimisation steps on one batch (all finite); a network's extra losses are added
    with `extra_loss_weights`, as the engine's `training_loss` does."""
    losses, weights = [], extra_loss_weights or {}
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = criterion(model(images), truth)
        if isinstance(model, ExtraLosses):
            for name, value in model.extra_losses(truth).items():
                loss = loss + weights[name] * value
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    return losses


def check_edge_extra_loss(model: torch.nn.Module, edge_head: torch.nn.Module, unreached: torch.nn.Parameter,
                          size: int = 64) -> None:
    """An edge-supervised network (medseg.models.targets.EdgeSupervised): its training forward keeps `edge_head`'s
    logits upsampled to the input size, extra_losses(mask) is their BCE with logits against mask_edges(mask), its
    gradient reaches the edge head but not `unreached` (a parameter after the edge branch), and the logits are
    scored once: a second call, or one after an eval forward only, finds none."""
    images, truth = toy_batch(size)
    head_logits = []
    hook = edge_head.register_forward_hook(lambda module, inputs, output: head_logits.append(output))
    model.train().zero_grad()
    model(images)
    hook.remove()
    losses = model.extra_losses(truth)
    assert set(losses) == {"edge"} and torch.isfinite(losses["edge"])
    logits = F.interpolate(head_logits[0], size=(size, size), mode="bilinear", align_corners=False)
    assert torch.allclose(losses["edge"], F.binary_cross_entropy_with_logits(logits, mask_edges(truth)))
    losses["edge"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in edge_head.parameters())
    assert unreached.grad is None
    check_scored_once(model, images, truth)


def check_scored_once(model: torch.nn.Module, images: torch.Tensor, truth: torch.Tensor) -> None:
    """After extra_losses(truth) has scored a training forward's outputs: a second call finds none, and neither does
    one after an eval forward only (eval forwards keep nothing)."""
    with pytest.raises(MedsegError, match="training forward"):
        model.extra_losses(truth)  # dropped once scored
    with torch.no_grad():
        model.eval()(images)
    with pytest.raises(MedsegError, match="training forward"):
        model.extra_losses(truth)  # an eval forward keeps nothing
