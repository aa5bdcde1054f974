"""Optimisers and learning-rate schedules from the recipe (`optim:` and `schedule:`).

Parameter groups: a network may expose `param_groups() -> {"encoder": [...], "decoder": [...]}`; the
recipe's `optim.group_lr: {encoder: 0.1}` multiplies the base lr of that group (M2SNet's 0.1x
backbone). Parameters in no named group train at the base lr.

Schedules: `step` (x gamma every step_size epochs), `multistep` (x gamma once after each epoch of
`milestones`: Fovea-UNet's 1e-4 for 30 epochs, then 1e-5 to the end), `cosine` (to min_lr), `poly`
((1 - t/T)^power), `plateau` (ReduceLROnPlateau on a logged metric), `warmup_linear` (linear rise to the
peak, then linear decay: with the default peak at (T + 1) / 2 it is M2SNet's triangle
lr_e = lr (1 - |2(e+1)/(T+1) - 1|)).

Every schedule with a horizon (cosine, poly, warmup_linear) is a closed-form factor of (step, T) on LambdaLR,
whose saved state holds no horizon: a run resumed with more (or fewer) `train.epochs` follows the schedule
planned for the new length from the step it stopped at, exactly as a run trained for that length from the
start would. (CosineAnnealingLR would restore its old T_max and, being recursive, stay at min_lr.)
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from medseg.config import OptimConfig, ScheduleConfig
from medseg.errors import MedsegError
from medseg.models.base import KernelRegularised, SegmentationNetwork


def parameter_groups(model: SegmentationNetwork, optim: OptimConfig) -> list[dict[str, Any]]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not optim.group_lr:
        return [{"params": trainable, "lr": optim.lr, "name": "all"}]
    named = model.param_groups()
    unknown = sorted(set(optim.group_lr) - set(named))
    if unknown:
        raise MedsegError(f"optim.group_lr names unknown groups {unknown}; this network has: {sorted(named)}")
    groups, assigned = [], set()
    for name, params in named.items():
        params = [p for p in params if p.requires_grad and id(p) not in assigned]
        assigned.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "lr": optim.lr * optim.group_lr.get(name, 1.0), "name": name})
    rest = [p for p in trainable if id(p) not in assigned]
    if rest:
        groups.append({"params": rest, "lr": optim.lr, "name": "rest"})
    return groups


def build_optimizer(model: SegmentationNetwork, optim: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov,
                               weight_decay=optim.weight_decay)
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.name == "nadam":  # its momentum_decay 4e-3 is Keras' Nadam schedule_decay
        return torch.optim.NAdam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def l2_kernels(model: nn.Module) -> list[tuple[nn.Parameter, float]]:
    """The conv kernels `optim.kernel_l2` acts on, with their factors: those a network names
    (`regularised_kernels() -> [(weight, factor)]`, FocusNet), else every conv kernel with factor 1."""
    if isinstance(model, KernelRegularised):
        kernels = model.regularised_kernels()
    else:
        kernels = [(m.weight, 1.0) for m in model.modules() if isinstance(m, CONVOLUTIONS)]
    if not kernels:
        raise MedsegError(f"optim.kernel_l2 is set but {type(model).__name__} has no convolutions")
    return kernels


def conv_kernel_l2(kernels: list[tuple[nn.Parameter, float]]) -> torch.Tensor:
    """sum(factor * w^2): Keras' `kernel_regularizer=l2(...)` term, which the loss carries (unlike decoupled
    weight decay, it passes through Adam's moment estimates)."""
    return torch.stack([factor * w.float().pow(2).sum() for w, factor in kernels]).sum()


def warmup_linear_factor(unit: int, total: int, peak: float) -> float:
    """lr factor at 0-based `unit` of `total`: rises linearly to 1 at `peak` (1-based), then falls linearly."""
    position = unit + 1
    if position <= peak:
        return position / peak
    return max(0.0, (total + 1 - position) / (total + 1 - peak))


def cosine_factor(base_lr: float, min_lr: float, total: int) -> Callable[[int], float]:
    """lr factor of cosine annealing from `base_lr` to `min_lr` over `total` units (CosineAnnealingLR's closed
    form, eta_min absolute as there)."""
    floor = min_lr / base_lr if base_lr else 0.0
    return lambda unit: floor + (1 - floor) * (1 + math.cos(math.pi * min(unit, total) / total)) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, epochs: int,
                    steps_per_epoch: int) -> dict[str, Any] | None:
    """A Lightning lr_scheduler config, or None for a constant lr."""
    per_step = schedule.interval == "step"
    total = epochs * steps_per_epoch if per_step else epochs
    name = schedule.name
    if name == "none":
        return None
    if name in ("step", "multistep"):
        if per_step:
            raise MedsegError(f"schedule {name} counts epochs; set schedule.interval: epoch")
        scheduler = (torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.step_size, gamma=schedule.gamma)
                     if name == "step" else
                     torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=schedule.milestones,
                                                          gamma=schedule.gamma))
    elif name == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [cosine_factor(group["lr"], schedule.min_lr, total) for group in optimizer.param_groups])
    elif name == "poly":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: max(0.0, 1 - u / total) ** schedule.power)
    elif name == "warmup_linear":
        peak_epochs = schedule.warmup_epochs if schedule.warmup_epochs is not None else (epochs + 1) / 2
        peak = peak_epochs * (steps_per_epoch if per_step else 1)
        if not 0 < peak <= total:
            raise MedsegError(f"schedule.warmup_epochs must lie in (0, {epochs}], got {schedule.warmup_epochs}")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: warmup_linear_factor(u, total, peak))
    else:  # plateau
        if per_step:
            raise MedsegError("schedule plateau reacts to epoch metrics; set schedule.interval: epoch")
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=schedule.mode, factor=schedule.factor, patience=schedule.patience,
            threshold=schedule.threshold, threshold_mode=schedule.threshold_mode, min_lr=schedule.min_lr)
        return {"scheduler": scheduler, "interval": "epoch", "monitor": schedule.monitor, "strict": True}
    return {"scheduler": scheduler, "interval": schedule.interval}

