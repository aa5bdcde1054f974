"""The one loss registry and the recipe's weighted sum of terms.

A recipe lists terms, e.g. `loss: [{name: bce, weight: 1.0}, {name: dice, weight: 1.0, smooth: 1.0}]`;
`build_loss` turns that into one module that returns the weighted total plus each term's value for
logging. A deeply supervised network's list of outputs goes through `DeepSupervisionLoss`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError

_LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str):
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        _LOSSES[name] = cls
        cls.loss_name = name
        return cls

    return wrap


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def check_loss_options(name: str, options: list[str] | dict[str, Any]) -> type[nn.Module]:
    """The registered class of loss `name`, after checking that it takes every option named (nothing is built)."""
    if name not in _LOSSES:
        raise MedsegError(f"unknown loss {name!r}; registered losses: {', '.join(list_losses())}")
    cls = _LOSSES[name]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        known = sorted(k for k in accepted if k != "self")
        raise MedsegError(f"loss {name!r} has no option {', '.join(unknown)}; "
                          f"its options are: {', '.join(known) or 'none'}")
    return cls


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    return check_loss_options(name, kwargs)(**kwargs)


class CompositeLoss(nn.Module):
    """sum_i weight_i * loss_i(logits, target); returns (total, {name: unweighted value})."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        if not terms:
            raise MedsegError("the recipe's loss list is empty; give at least one term, e.g. [{name: dice}]")
        self.names = [name for name, _, _ in terms]
        if len(set(self.names)) != len(self.names):
            raise MedsegError(f"the recipe lists a loss twice: {self.names}; merge the terms or change their weights")
        self.weights = [float(weight) for _, weight, _ in terms]
        self.terms = nn.ModuleList(module for _, _, module in terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: term(logits, target) for name, term in zip(self.names, self.terms)}
        total = sum(weight * value for weight, value in zip(self.weights, parts.values()))
        return total, parts


class SegmentationLoss(nn.Module):
    """The trainer's criterion: the recipe's terms on one output, or on every output of a deeply
    supervised network (a list, main output first).

    Each output of a list is scored against the target resized to that output's size (nearest, so
    labels stay labels). Weights default to 1 for every output, i.e. the plain sum used by UNet++ and
    ANU-Net.
    """

    def __init__(self, loss: CompositeLoss, weights: list[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = weights

    def forward(self, outputs: torch.Tensor | list[torch.Tensor],
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights if self.weights is not None else [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise MedsegError(f"deep supervision has {len(weights)} weights but the network returned "
                              f"{len(outputs)} outputs; "
                              "set train.deep_supervision_weights to one weight per output")
        total = torch.zeros((), device=outputs[0].device)
        parts: dict[str, torch.Tensor] = {}
        for weight, output in zip(weights, outputs):
            value, head_parts = self.loss(output, resize_target(target, output.shape[-2:]))
            total = total + weight * value
            for name, part in head_parts.items():
                parts[name] = parts.get(name, 0.0) + weight * part.detach()
        return total, parts


def resize_target(target: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    squeeze = target.dim() == 3
    resized = F.interpolate((target.unsqueeze(1) if squeeze else target).float(), size=tuple(size),
                            mode="nearest-exact")
    resized = resized.squeeze(1) if squeeze else resized
    return resized.to(target.dtype)


def build_loss(terms: list[dict[str, Any]], deep_supervision_weights: list[float] | None = None) -> SegmentationLoss:
    """Build the recipe's loss from its term list, e.g. [{"name": "dice", "weight": 1.0, "smooth": 1.0}]."""
    built = []
    for spec in terms:
        spec = dict(spec)
        name = spec.pop("name")
        weight = spec.pop("weight", 1.0)
        built.append((name, weight, create_loss(name, **spec)))
    return SegmentationLoss(CompositeLoss(built), deep_supervision_weights)
