"""Shared by the baseline tests (tests/test_baselines_*.py): parameter counting and the short CPU training check
of a recipe's network on one tiny batch."""

from __future__ import annotations

import torch

import medseg
from medseg.config import load_recipe
from medseg.engine.optim import build_optimizer
from medseg.losses import build_loss
from medseg.models.base import ExtraLosses


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
                           recipe.train.extra_loss_weights)


def training_losses(model: torch.nn.Module, criterion, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                    truth: torch.Tensor, steps: int, extra_loss_weights: dict[str, float] | None = None) -> list[float]:
    """The loss at each of `steps` optimisation steps on one batch (all finite), with the network's own extra
    losses (`ExtraLosses`) weighted as the engine weighs them (each must have a weight)."""
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = criterion(model(images), truth)
        if isinstance(model, ExtraLosses):
            for name, value in model.extra_losses(truth).items():
                loss = loss + (extra_loss_weights or {})[name] * value
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    return losses
