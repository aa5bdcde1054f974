"""Training callbacks: `metrics.csv` (one row per epoch) and a one-line epoch summary on the console."""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tqdm import tqdm

from medseg.engine.run import write_text_atomic
from medseg.errors import MedsegError


class EpochMetrics(L.Callback):
    """After each validation: append a row to metrics.csv and print a summary line (rank zero only).

    The row is written before the checkpoint callbacks run, so a run killed afterwards resumes from a
    checkpoint whose epoch is already in the file; on resume, rows past the checkpoint are dropped.
    Train loss, and each term of a composite loss the training step reports under "terms", is the mean of
    this rank's step values over the epoch (Lightning's own epoch means of train metrics are only ready
    after validation, one epoch late for this row).
    """

    def __init__(self, path: Path, echo: bool = True, echo_progress: bool = False):
        self.path = Path(path)
        self.echo = echo
        self.echo_progress = echo_progress  # without a progress bar (logs, pipes): a line per tenth of an epoch
        self._losses: list[float] = []
        self._terms: dict[str, list[float]] = {}
        self._lrs: dict[str, float] = {}
        self._started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # current_epoch is restored from the checkpoint by now
        if trainer.is_global_zero and self.path.is_file():
            rows = self._read()
            kept = [r for r in rows if int(r["epoch"]) < trainer.current_epoch]
            if len(kept) != len(rows):
                self._write(kept, list(rows[0].keys()))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the lr this epoch trains with: epoch schedulers step after the last batch, before validation
        groups = trainer.optimizers[0].param_groups
        self._lrs = {f"lr_{g.get('name', 'all')}" if len(groups) > 1 else "lr": g["lr"] for g in groups}
        self._losses = []
        self._terms = {}
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))
        for name, value in (outputs.get("terms", {}) if isinstance(outputs, dict) else {}).items():
            self._terms.setdefault(name, []).append(float(value))
        total = trainer.num_training_batches
        if self.echo_progress and trainer.is_global_zero and isinstance(total, int) and total >= 20:
            done = batch_idx + 1
            if done % math.ceil(total / 10) == 0 and done < total:
                tqdm.write(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {done}/{total} batches, "
                           f"loss {sum(self._losses) / len(self._losses):.4g}, {time.perf_counter() - self._started:.0f}s")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": trainer.current_epoch,
                               "train_loss": sum(self._losses) / len(self._losses) if self._losses else math.nan}
        for name, values in self._terms.items():  # the terms of a composite loss: train_dice, train_kernel_l2, ...
            row[f"train_{name}"] = sum(values) / len(values)
        for key in sorted(metrics):
            if key.startswith("val/"):
                row[key.replace("/", "_")] = float(metrics[key])
        row.update(self._lrs)
        row["seconds"] = time.perf_counter() - self._started
        rows = self._read() if self.path.is_file() else []
        rows = [r for r in rows if int(r["epoch"]) != row["epoch"]] + [row]
        self._write(rows, list(row.keys()))
        if self.echo:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "seconds"))
            tqdm.write(f"epoch {row['epoch'] + 1}/{trainer.max_epochs}  {shown}  ({row['seconds']:.1f}s)")

    def _read(self) -> list[dict[str, str]]:
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def _write(self, rows: list[dict[str, Any]], fields: list[str]) -> None:
        for r in rows:
            fields += [k for k in r if k not in fields]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, buffer.getvalue())


class FreezeGroups(L.Callback):
    """`train.freeze`: the named parameter groups take no gradient and their BatchNorm layers keep their
    running statistics (eval mode) while current_epoch < epochs; from then on they train. Works for any
    network with `param_groups()`; the lr change that usually goes with unfreezing is the schedule's job
    (e.g. `schedule: {name: step, step_size: 30, gamma: 0.1}`)."""

    def __init__(self, groups: list[str], epochs: int):
        self.groups, self.epochs = groups, epochs
        self.params: list[torch.nn.Parameter] = []
        self.norms: list[torch.nn.Module] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.params, self.norms = self.members(pl_module.model)  # once, not per epoch or batch

    def members(self, model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Module]]:
        named = model.param_groups()
        unknown = [g for g in self.groups if g not in named]
        if unknown:
            raise MedsegError(f"train.freeze names groups {unknown} that {type(model).__name__} does not have; "
                              f"its groups: {sorted(named) or 'none'}")
        params = [p for g in self.groups for p in named[g]]
        ids = {id(p) for p in params}
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 and m.weight is not None and id(m.weight) in ids]
        return params, norms

    def frozen(self, epoch: int) -> bool:
        return epoch < self.epochs

    def apply(self, model: torch.nn.Module, epoch: int) -> None:
        frozen = self.frozen(epoch)
        for p in self.params:
            p.requires_grad_(not frozen)
        for m in self.norms:  # Lightning restores each module's own mode after validation, so set it both ways
            m.train(not frozen and model.training)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.apply(pl_module.model, trainer.current_epoch)
        if trainer.is_global_zero and trainer.current_epoch in (0, self.epochs):
            state = "frozen" if self.frozen(trainer.current_epoch) else "trainable from now on"
            tqdm.write(f"epoch {trainer.current_epoch + 1}: {', '.join(self.groups)} {state}")
