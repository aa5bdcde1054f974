"""Training loggers and callbacks, on Lightning's stock pieces.

- `EpochCSVLogger`: Lightning's CSVLogger writing RUN/metrics.csv, one row per epoch, columns named by
  `epoch_columns`: epoch, train_loss, train_<term> (each term of a composite loss), val_loss, val_dice,
  val_iou, ..., lr (or lr_<group> for an optimiser with named groups), seconds.
- `build_loggers`: that logger plus the recipe's optional TensorBoard (RUN/tensorboard/) and MLflow (a local
  store in RUN/mlruns/) loggers.
- `EpochSummary`: the console's one-line epoch summary and, without a progress bar, progress lines; it logs
  each epoch's wall time as `seconds`.
- `FreezeGroups`: `train.freeze` on Lightning's BaseFinetuning.
- `RandomStates`: the process's random states (torch, CUDA, NumPy, Python) saved in every checkpoint and
  restored on resume, so a resumed run draws what the uninterrupted one would (dropout, say).
- `FiniteLoss`: stops training with one clear line when the training loss stops being a number.

Console lines come from rank zero only (`say`).
"""

from __future__ import annotations

import csv
import importlib
import io
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

from medseg.errors import MedsegError
from medseg.files import write_text_atomic


@rank_zero_only
def say(message: str) -> None:
    """One console line, from rank zero only, written around a progress bar when one is showing."""
    tqdm.write(message)
    sys.stdout.flush()


def column_of(key: str) -> str | None:
    """The metrics.csv column of one of Lightning's metric names: train/loss_epoch -> train_loss, val/dice ->
    val_dice, seconds -> seconds; a per-step value (train/loss_step) has none. Learning rates: `epoch_columns`."""
    if key.endswith("_step"):
        return None
    return key.removesuffix("_epoch").replace("/", "_")


def epoch_columns(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Lightning's metric names and values -> metrics.csv columns. LearningRateMonitor's `lr-Adam/all` is `lr`
    when the optimiser has one group, `lr-Adam/encoder` is `lr_encoder` when it has several."""
    lrs = [key for key in metrics if key.startswith("lr-")]
    columns: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith("lr-"):
            name: str | None = "lr" if len(lrs) == 1 else "lr_" + key.rsplit("/", 1)[-1]
        else:
            name = column_of(key)
        if name is not None:
            columns[name] = float(value)
    return columns


COLUMN_KINDS: tuple[Callable[[str], bool], ...] = (
    lambda c: c == "epoch",
    lambda c: c == "train_loss",
    lambda c: c.startswith("train_"),
    lambda c: c.startswith("val_"),
    lambda c: c == "lr" or c.startswith("lr_"),
    lambda c: c == "seconds",
)


def column_order(column: str) -> tuple[int, str]:
    """epoch, train_loss, the other train_ columns, val_, lr, seconds, anything else; by name within each."""
    return next((rank for rank, kind in enumerate(COLUMN_KINDS) if kind(column)), len(COLUMN_KINDS)), column


class EpochCSVLogger(CSVLogger):
    """Lightning's CSVLogger, writing `path` (RUN/metrics.csv) with one row per epoch in `epoch_columns`
    names, instead of a row per logging call under lightning_logs/version_N/.

    The file is rewritten whole (atomically) whenever the values of an epoch change, so it holds every
    value logged so far. `start_at(epoch)` drops the rows from `epoch` on: a resumed fit re-trains them
    (`ResumeMetricsTable` calls it once the checkpoint is restored). Values logged without an epoch
    (LearningRateMonitor's lr at an epoch's start) belong to the epoch after the last one seen.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(save_dir=self.path.parent, name="", version="")
        self.rows: dict[int, dict[str, Any]] = {int(row["epoch"]): row for row in self._read()}
        self._epoch = -1
        self._changed = False

    @property
    def log_dir(self) -> str:
        return str(self.path.parent)

    @property
    def experiment(self) -> "EpochCSVLogger":
        """The table itself (Lightning's ExperimentWriter would delete an existing metrics.csv)."""
        return self

    @rank_zero_only
    def start_at(self, epoch: int) -> None:
        kept = {e: row for e, row in self.rows.items() if e < epoch}
        self._changed = self._changed or len(kept) != len(self.rows)
        self.rows, self._epoch = kept, epoch - 1
        self.save()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if "epoch" in metrics:
            self._epoch = int(metrics["epoch"])
        epoch = self._epoch if "epoch" in metrics else self._epoch + 1
        columns = epoch_columns({k: v for k, v in metrics.items() if k != "epoch"})
        if columns:
            self.rows.setdefault(epoch, {"epoch": epoch}).update(columns)
            self._changed = True

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Not written: the run's config.yaml is the recipe, and no hparams.yaml goes beside metrics.csv."""

    @rank_zero_only
    def save(self) -> None:
        if not self._changed:
            return
        rows = [self.rows[e] for e in sorted(self.rows)]
        fields = sorted({key for row in rows for key in row}, key=column_order)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, buffer.getvalue())
        self._changed = False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))


class ResumeMetricsTable(L.Callback):
    """At the start of training (the checkpoint's epoch counter restored by then), drop the table's rows from
    the first epoch this fit trains: a run killed after logging an epoch but before checkpointing it trains that
    epoch again, and its row is written anew; the rows before are kept."""

    def __init__(self, table: EpochCSVLogger):
        self.table = table

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.table.start_at(trainer.current_epoch)


def _require(package: str) -> None:
    try:
        importlib.import_module(package)
    except ImportError:
        raise MedsegError(f"train.loggers names {package}, which is not installed: "
                          f"pip install 'medseg[{package}]'") from None


def _tensorboard(folder: Path) -> Logger:
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=folder, name="tensorboard", version="", default_hp_metric=False)


def _mlflow(folder: Path) -> Logger:
    """MLflow's tracking store as one SQLite file in RUN/mlruns/ (MLflow 3 keeps plain-folder stores in maintenance
    mode): `mlflow ui --backend-store-uri sqlite:///RUN/mlruns/mlflow.db`. A resumed run continues its MLflow run."""
    from lightning.pytorch.loggers import MLFlowLogger

    for noisy in ("mlflow", "alembic", "lightning.pytorch.loggers.mlflow"):  # database set-up, "creating experiment"
        logging.getLogger(noisy).setLevel(logging.ERROR)
    store = folder / "mlruns"
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store.resolve() / 'mlflow.db'}"
    return MLFlowLogger(experiment_name="medseg", run_name=folder.name, tracking_uri=uri,
                        artifact_location=(store / "artifacts").resolve().as_uri(),
                        run_id=_mlflow_run_id(uri))


def _mlflow_run_id(uri: str) -> str | None:
    """The latest MLflow run in this run folder's own store (a resume continues it), or None (a new one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("medseg")
    found = [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1,
                                                             order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


OPTIONAL_LOGGERS: dict[str, Callable[[Path], Logger]] = {"tensorboard": _tensorboard, "mlflow": _mlflow}


def check_loggers(names: Sequence[str]) -> None:
    """Each optional logger named has its package (imported only when named): a one-line MedsegError otherwise."""
    for name in names:
        if name in OPTIONAL_LOGGERS:
            _require(name)


def build_loggers(names: Sequence[str], folder: Path) -> list[Logger]:
    """metrics.csv's logger first (always), then the optional ones named, writing into the run folder."""
    check_loggers(names)
    return [EpochCSVLogger(folder / "metrics.csv"), *(OPTIONAL_LOGGERS[name](folder) for name in names
                                                      if name in OPTIONAL_LOGGERS)]


class EpochSummary(L.Callback):
    """The console's view of training, rank zero only: after each epoch one line with the values of the
    metrics.csv columns; without a progress bar (logs, pipes) also a line per tenth of an epoch. It logs each
    epoch's wall time (training and validation) as `seconds`."""

    def __init__(self, progress_lines: bool = False):
        self.progress_lines = progress_lines
        self._losses: list[float] = []
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._losses = []
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        total = trainer.num_training_batches
        if not self.progress_lines or not isinstance(total, int) or total < 20:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))
        done = batch_idx + 1
        if done % math.ceil(total / 10) == 0 and done < total and self._losses:
            say(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {done}/{total} batches, "
                f"loss {sum(self._losses) / len(self._losses):.4g}, {time.perf_counter() - self._started:.0f}s")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._started
        pl_module.log("seconds", seconds, on_step=False, on_epoch=True, batch_size=1, sync_dist=True, reduce_fx="max")
        columns = epoch_columns(trainer.callback_metrics)
        shown = "  ".join(f"{name} {columns[name]:.4g}" for name in sorted(columns, key=column_order)
                          if name not in ("epoch", "seconds"))
        say(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}  ({seconds:.1f}s)")


def freeze_members(model: torch.nn.Module, groups: Sequence[str]) -> tuple[list[torch.nn.Parameter],
                                                                           list[torch.nn.Module]]:
    """The parameters of the named `param_groups()` and the BatchNorm layers they hold (an unknown name is a
    MedsegError naming the network's groups)."""
    named = model.param_groups()
    unknown = [g for g in groups if g not in named]
    if unknown:
        raise MedsegError(f"train.freeze names groups {unknown} that {type(model).__name__} does not have; "
                          f"its groups: {sorted(named) or 'none'}")
    params = [p for g in groups for p in named[g]]
    ids = {id(p) for p in params}
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.weight is not None and id(m.weight) in ids]
    return params, norms


class FreezeGroups(BaseFinetuning):
    """`train.freeze`: the named parameter groups take no gradient and their BatchNorm layers keep their
    running statistics (eval mode) while current_epoch < epochs; from then on they train. Works for any
    network with `param_groups()`; the lr change that usually goes with unfreezing is the schedule's job
    (e.g. `schedule: {name: multistep, milestones: [30], gamma: 0.1}`).

    The optimiser holds the frozen parameters all along, in their recipe group (`optim.group_lr`), so
    unfreezing adds no parameter group and the schedule and a resume see one layout throughout."""

    def __init__(self, groups: Sequence[str], epochs: int):
        super().__init__()
        self.groups, self.epochs = list(groups), epochs
        self.params: list[torch.nn.Parameter] = []
        self.norms: list[torch.nn.Module] = []
        self._frozen: bool | None = None

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Called in `setup`, before the optimiser and DDP exist: find the groups' parameters and BatchNorm
        layers, once (an unknown group stops here). They are frozen at the first epoch's start by
        `finetune_function`, not now: the optimiser must hold them for when they train, and DDP reduces the
        gradients of only those parameters that require one when it wraps the model."""
        self.params, self.norms = freeze_members(pl_module.model, self.groups)
        self._frozen = None

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        frozen = epoch < self.epochs
        for p in self.params:
            p.requires_grad_(not frozen)
        for m in self.norms:  # Lightning restores each module's own mode after validation, so set it both ways
            m.train(not frozen and pl_module.model.training)
        if frozen != self._frozen:
            say(f"epoch {epoch + 1}: {', '.join(self.groups)} {'frozen' if frozen else 'trainable from now on'}")
        self._frozen = frozen


class RandomStates(L.Callback):
    """Save the random states in each checkpoint and restore them on resume (see the module docstring). Stored
    as tensors and plain numbers, so checkpoints still load with `weights_only=True`."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        version, python_state, gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                          "has_gauss": int(has_gauss), "cached": float(cached)},
                "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                           "gauss": gauss}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        numpy_state = state["numpy"]
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                             numpy_state["has_gauss"], numpy_state["cached"]))
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"]))


class FiniteLoss(L.Callback):
    """Refuse to go on training once the loss is NaN or infinite: every later step would only spread it through
    the weights, and the run would end "finished" with a network that predicts nothing."""

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        if loss is not None and not torch.isfinite(loss.detach()).all():
            raise MedsegError(
                f"the training loss became {float(loss.detach().float())} at epoch {trainer.current_epoch + 1}, "
                f"batch {batch_idx + 1}; training stopped: lower optim.lr or set train.gradient_clip, and run "
                "`medseg check-data` on the data")
