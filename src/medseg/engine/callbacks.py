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


class EpochMetrics(L.Callback):
    """After each validation: append a row to metrics.csv and print a summary line (rank zero only).

    The row is written before the checkpoint callbacks run, so a run killed afterwards resumes from a
    checkpoint whose epoch is already in the file; on resume, rows past the checkpoint are dropped.
    Train loss is the mean of this rank's step losses over the epoch.
    """

    def __init__(self, path: Path, echo: bool = True, echo_progress: bool = False):
        self.path = Path(path)
        self.echo = echo
        self.echo_progress = echo_progress  # without a progress bar (logs, pipes): a line per tenth of an epoch
        self._losses: list[float] = []
        self._started = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # current_epoch is restored from the checkpoint by now
        if trainer.is_global_zero and self.path.is_file():
            rows = self._read()
            kept = [r for r in rows if int(r["epoch"]) < trainer.current_epoch]
            if len(kept) != len(rows):
                self._write(kept, list(rows[0].keys()))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._losses = []
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))
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
        for key in sorted(metrics):
            if key.startswith("val/"):
                row[key.replace("/", "_")] = float(metrics[key])
        for group in trainer.optimizers[0].param_groups:
            row[f"lr_{group.get('name', 'all')}" if len(trainer.optimizers[0].param_groups) > 1 else "lr"] = group["lr"]
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
