"""The Lightning module: one network, the recipe's loss, optimiser and schedule; no per-model cases.

Training: the network's output (a tensor, or a list for deep supervision) goes through the recipe's loss; an
`EpochScheduled` network is told each epoch before it trains; extra terms a network reports through
`extra_losses(mask)` (a regulariser, an auxiliary output scored against a target derived from the mask) are
added with the weights of `train.extra_loss_weights`, and `optim.kernel_l2` adds a Keras-style L2 of the conv
kernels (FocusNet). Validation: the eval-mode output is scored per image at threshold 0.5 (argmax for multi-
class) with the `paper` protocol's empty rule, so `val/dice` is the mean per-image Dice that `best.ckpt` is
chosen by. `val/loss` is the loss of that one output, so for a deeply supervised network it is on another
scale than `train/loss` (the weighted sum over all heads).

Logging: `train/loss` and, for a composite loss, each term (`train/dice`, `train/nhsic`, `train/kernel_l2`, ...)
per step and as epoch means, `val/*` as epoch means, all with `self.log_dict` / `self.log` to the trainer's
loggers (metrics.csv names them train_loss, train_dice, val_dice, ...).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from medseg.config import Recipe
from medseg.engine.callbacks import freeze_members
from medseg.engine.optim import build_optimizer, build_scheduler, conv_kernel_l2, l2_kernels
from medseg.errors import MedsegError
from medseg.losses import build_loss
from medseg.losses.m2snet import LossNet
from medseg.metrics import confusion_counts, predict_labels, summary_metrics
from medseg.models import create_model
from medseg.models.base import EpochScheduled, ExtraLosses
from medseg.weights import LoadReport

VAL_METRICS = ("dice", "iou", "mdice", "miou", "sensitivity", "precision")


def activate(logits: torch.Tensor) -> torch.Tensor:
    """Logits -> probabilities: sigmoid for one channel, softmax over channels otherwise."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else logits.softmax(dim=1)


def as_float(outputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A network's output(s) in fp32: under autocast the losses and metrics must not sum in bf16."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float()
    return [output.float() for output in outputs]


class SegmentationModule(L.LightningModule):
    def __init__(self, recipe: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters({"recipe": recipe})
        self.recipe = Recipe.model_validate(recipe)
        cfg = self.recipe.model
        self.model = create_model(cfg.name, cfg.in_channels, cfg.num_classes, **cfg.options())
        self.criterion = build_loss([t.model_dump() for t in self.recipe.loss],
                                    self.recipe.train.deep_supervision_weights)
        self.num_classes = cfg.num_classes
        self.l2_kernels = l2_kernels(self.model) if self.recipe.optim.kernel_l2 else []  # listed once, not per step
        self.channels_last = False

    def use_channels_last(self, enabled: bool) -> None:
        """Keep the network's weights, and convert each batch, to channels_last (the CPU bf16 fast path)."""
        self.channels_last = enabled
        if enabled:
            self.model.to(memory_format=torch.channels_last)

    def _images(self, batch: dict[str, Any]) -> torch.Tensor:
        images = batch["image"]
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def weight_reports(self) -> list[LoadReport]:
        """What each local weights file loaded: the network's (encoder, whole network) and the losses' (LossNet)."""
        losses = [m.load_report for m in self.criterion.modules() if isinstance(m, LossNet) and m.load_report]
        return [*self.model.load_reports, *losses]

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.model(images)

    def _extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        extras = self.model.extra_losses(mask) if isinstance(self.model, ExtraLosses) else {}
        weights = self.recipe.train.extra_loss_weights
        unweighted = sorted(set(extras) - set(weights))
        if unweighted:
            raise MedsegError(f"the network reports extra losses {unweighted} that the recipe gives no weight; "
                              "set train.extra_loss_weights (0 to log them without training on them)")
        return extras

    def training_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss to minimise, its named terms): the recipe's loss, the network's weighted extra losses and the
        Keras-style kernel L2; what `training_step` logs and `medseg benchmark --train`'s bare loop trains on."""
        outputs = as_float(self.model(self._images(batch)))  # the loss is computed on fp32 outputs under autocast
        loss, parts = self.criterion(outputs, batch["mask"])
        for name, value in self._extra_losses(batch["mask"]).items():
            loss = loss + self.recipe.train.extra_loss_weights[name] * value
            parts[name] = value
        if self.recipe.optim.kernel_l2:
            parts["kernel_l2"] = conv_kernel_l2(self.l2_kernels)
            loss = loss + self.recipe.optim.kernel_l2 * parts["kernel_l2"]
        return loss, parts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.training_loss(batch)
        logged = {"train/loss": loss}
        if len(parts) > 1:  # each term of a composite loss (a single term is the loss itself)
            logged.update({f"train/{name}": value.detach() for name, value in parts.items()})
        self.log_dict(logged, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch["image"].shape[0],
                      sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = as_float(self.model(self._images(batch)))
        loss, _ = self.criterion(logits, batch["mask"])
        labels = predict_labels(activate(logits), 0.5)
        scores = summary_metrics(confusion_counts(labels, batch["mask"], self.num_classes), empty="one")
        size = batch["image"].shape[0]
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        for name in VAL_METRICS:
            self.log(f"val/{name}", scores[name].float().mean(), on_epoch=True, prog_bar=name == "dice",
                     batch_size=size, sync_dist=True)

    def check_training_setup(self) -> None:
        """Build the optimiser and schedule once (thrown away) and find `train.freeze`'s groups: a mistake in
        those recipe sections (an unknown group, a warm-up past the last epoch) stops `train` before the run
        folder exists instead of inside `fit`."""
        optimizer = build_optimizer(self.model, self.recipe.optim)
        build_scheduler(optimizer, self.recipe.schedule, self.recipe.train.epochs, 1)
        if self.recipe.train.freeze:
            freeze_members(self.model, self.recipe.train.freeze.groups)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, self.recipe.optim)
        steps = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        scheduler = build_scheduler(optimizer, self.recipe.schedule, self.recipe.train.epochs, steps)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_epoch_start(self) -> None:
        if isinstance(self.model, EpochScheduled):
            self.model.set_training_progress(self.current_epoch, self.recipe.train.epochs)

    def on_train_start(self) -> None:
        """A run resumed with another `train.epochs`: the restored optimiser holds the lr the old plan gave for
        this step, and LambdaLR recomputes it only at its next step; so the first resumed epoch would train at
        the old plan's lr (its floor, for a finished cosine run). Recompute it from the new plan now (a no-op
        for a new run)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                                               scheduler.lr_lambdas):
                    group["lr"] = base * factor(scheduler.last_epoch)
