"""`medseg train`: a recipe and a data folder in, a run folder out.

`train` is a sequence of stages, each a function below:

    resolve_run        the run folder: a new one, a resumed one (its stored recipe plus overrides, its splits), or,
                       in a DDP child process, rank 0's
    prepare_data       the SegmentationDataModule: data check, splits (the folder's, or the caller's for a new run),
                       dataset statistics, amplification plan
    build_module       the LightningModule, with the recipe's optimiser, schedule, freeze groups and loggers
                       checked
    load_initial_weights   a recipe's model.weights file (not on resume: the checkpoint has the weights)
    initialisation_notes   warnings where the initialisation differs from the paper's (random instead of
                       pretrained weights); `train.freeze` on a network no file initialised is skipped
    choose_mode        `train.precision` for this machine and network: bf16 + channels_last on a CPU with BF16
                       instructions, mixed precision on CUDA, else fp32 (medseg.engine.precision)
    write_run_files    config.yaml, splits.json, amplify.json (rank 0)
    fit                the trainer from `build_trainer`, then Lightning's fit (from last.ckpt on resume)
    export             model/ from the chosen checkpoint and curves.png from metrics.csv (rank 0)

Everything that can be refused (bad data, an empty split, a recipe mistake, a missing logger package) is
refused before the run folder exists. The trainer factory turns a recipe into a `lightning.Trainer`: the chosen
precision, DDP for `devices > 1` (gloo processes on CPU), `best.ckpt` by the recipe's monitor and
`last.ckpt`, early stopping, the recipe's loggers (metrics.csv always), a progress bar on terminals.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from medseg.config import Recipe
from medseg.data.splits import differing_splits
from medseg.data.volumes import slicing_record
from medseg.engine.allocator import tune_allocator
from medseg.engine.callbacks import (
    EpochCSVLogger,
    EpochSummary,
    FiniteLoss,
    FreezeGroups,
    RandomStates,
    ResumeMetricsTable,
    build_loggers,
    check_loggers,
    say,
)
from medseg.engine.curves import write_curves
from medseg.engine.data import SegmentationDataModule, preprocessing_of
from medseg.engine.data import default_workers as default_workers  # re-exported: evaluate and predict import it here
from medseg.engine.module import SegmentationModule
from medseg.engine.precision import NumericMode, choose_numeric_mode
from medseg.engine.run import Run, git_commit, new_run_dir, now, numbered_run_dirs, slug, versions
from medseg.errors import MedsegError
from medseg.files import check_output_folder, write_text_atomic
from medseg.models import save_model
from medseg.models.pretrained import load_network_weights
from medseg.models.registry import model_info

# Lightning's DDP launcher re-runs the command line in child processes; they must join rank 0's run
# folder instead of naming a new one.
RUN_DIR_ENV = "MEDSEG_RUN_DIR"
# config.yaml's `run.splits` for splits passed to `train` without a label of their own
GIVEN_SPLITS = "given by the caller"


def train(recipe: Recipe, data: str | Path, out: str | Path = "runs", name: str | None = None, devices: int = 1,
          resume: bool = False, overrides: Sequence[str] = (), callbacks: Sequence[L.Callback] = (),
          progress: bool | None = None, *, splits: dict[str, list[str]] | None = None,
          splits_source: str = GIVEN_SPLITS) -> Run:
    """Train `recipe` on the folder `data`; returns the run. With `resume`, the run's stored recipe is
    used (with `overrides` applied on top, e.g. more epochs) and training continues from last.ckpt.

    `splits` ({train, val, test} stem lists) are a new run's splits instead of the folder's: checked like a
    folder's splits.json, written to RUN/splits.json, and `splits_source` (e.g. "study polyp fold 2 of 5") is
    config.yaml's `run.splits`. A resumed run keeps its own splits.json; splits that differ from it are refused.
    """
    quiet_lightning()
    tune_allocator()
    data, out = Path(data).resolve(), Path(out)
    run, recipe, stored = resolve_run(recipe, data, out, name, resume, overrides, splits)
    if stored is None and splits is not None:
        datamodule = prepare_data(recipe, data, splits, splits_source)
    else:
        datamodule = prepare_data(recipe, data, stored)
    recipe = datamodule.recipe
    check_processes(datamodule, devices)
    module = build_module(recipe)
    from_checkpoint = resume and run.last_checkpoint.is_file()  # else a new run, or one started again
    if recipe.model.weights and not from_checkpoint:
        load_initial_weights(module, recipe)
    weights = [] if from_checkpoint else report_weights(module)
    notes: list[str] = []
    if not from_checkpoint:  # a resumed run's weights come from its checkpoint; its config.yaml keeps its notes
        recipe, notes = initialisation_notes(recipe, module)
        datamodule.recipe = recipe
    mode = choose_mode(recipe, module)
    if from_checkpoint:
        datamodule.first_epoch = checkpoint_epoch(run.last_checkpoint) + 1
    elif resume:
        run.metrics_file.unlink(missing_ok=True)  # rows of the attempt that never reached a checkpoint
    write_run_files(run, datamodule, devices, weights, mode, notes)
    trainer = fit(module, datamodule, run, devices, callbacks, progress, from_checkpoint, mode)
    export(trainer, run, recipe, data)
    return run


def resolve_run(recipe: Recipe, data: Path, out: Path, name: str | None, resume: bool,
                overrides: Sequence[str] = (), splits: dict[str, list[str]] | None = None,
                ) -> tuple[Run, Recipe, dict[str, list[str]] | None]:
    """(run, recipe to train, the run's stored splits or None for a new run). A DDP child joins rank 0's run with
    the recipe and splits rank 0 stored; a resumed run takes its stored recipe with `overrides` on top and its
    splits, and refuses caller-given `splits` that differ from them. `--resume` takes the `--name` run or the
    latest run of this recipe and data that has a checkpoint; a run that died before its first checkpoint is
    started again from its first epoch in its own folder."""
    if rank_zero_only.rank > 0 and os.environ.get(RUN_DIR_ENV):
        run = Run(os.environ[RUN_DIR_ENV])
        return run, run.recipe(), run.splits()
    check_output_folder(out, "--out")  # the one check of every command's output folder (medseg.files)
    if name is not None:
        check_run_name(name)
    base = name or f"{slug(recipe.name)}-{slug(data.name)}"
    if resume:
        run = Run(out / name) if name else resumable_run(out, base)
        if run is None or not run.config_file.is_file():
            raise MedsegError(f"nothing to resume: no run folder {out / base}* with a config.yaml; train first "
                              "(without --resume)")
        stored = run.config()["run"]
        if Path(stored["data"]) != data:
            raise MedsegError(f"{run.path} was trained on {stored['data']}, not {data}; resume with the same --data")
        own = run.splits()
        differ = differing_splits(splits, own) if splits is not None else []
        if differ:
            raise MedsegError(f"{run.path} was trained with other {'/'.join(differ)} stems than the splits given; "
                              "resume it without splits (its splits.json is kept) or train a new run under a new name")
        resumed = run.recipe(list(overrides))
        announce_resume(run, run.recipe(), resumed)
        return run, resumed, own
    if name and (out / name).exists():
        died = (out / name / "config.yaml").is_file() and not Run(out / name).last_checkpoint.is_file()
        raise MedsegError(f"run folder {out / name} exists" + (" (it stopped before its first checkpoint)" if died
                                                               else "") +
                          "; add --resume to continue it, or choose another --name")
    return Run(new_run_dir(out, base)), recipe, None


def check_run_name(name: str) -> None:
    """A run name is one folder name inside `--out`: no separators, no `..`, not hidden."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
        raise MedsegError(f"--name {name!r} must be a plain folder name inside --out (no '/', '..' or leading '.')")


def resumable_run(out: Path, base: str) -> Run | None:
    """The latest numbered run `base`, `base-2`, ... that has a checkpoint; else the latest with a config.yaml
    (a run stopped before its first checkpoint), else None."""
    runs = [Run(path) for path in numbered_run_dirs(out, base) if (path / "config.yaml").is_file()]
    with_checkpoint = [run for run in runs if run.last_checkpoint.is_file()]
    return (with_checkpoint or runs or [None])[-1]


def announce_resume(run: Run, before: Recipe, after: Recipe) -> None:
    """Say what a resume does: where it continues, and how a changed `train.epochs` changes the schedule."""
    if not run.last_checkpoint.is_file():
        say(f"{run.path} stopped before its first checkpoint: training it again from its first epoch")
        return
    say(f"resuming {run.path} from {run.last_checkpoint}")
    old, new = before.train.epochs, after.train.epochs
    if old != new:
        horizon = after.schedule.name in ("cosine", "poly", "warmup_linear")
        say(f"train.epochs {old} -> {new}: " + (
            f"the {after.schedule.name} schedule is re-planned for {new} epochs; from here on the learning rate is "
            f"what a {new}-epoch run has at each epoch" if horizon else
            f"the {after.schedule.name} schedule has no horizon and goes on unchanged"))


def prepare_data(recipe: Recipe, data: Path, splits: dict[str, list[str]] | None,
                 given_source: str | None = None) -> SegmentationDataModule:
    """The data module: `splits` are a resumed or joined run's own, or with `given_source` a caller's for a new run
    (see SegmentationDataModule); None draws them from the folder."""
    return SegmentationDataModule(recipe, data, splits, given_source)


def checkpoint_epoch(path: Path) -> int:
    """The 0-based epoch a Lightning checkpoint was saved in (memory-mapped: the weights are not read)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
        raise MedsegError(f"{path} cannot be read ({type(exc).__name__}: truncated, or not a Lightning checkpoint); "
                          "it cannot be resumed: train again under a new --name") from None


def check_processes(datamodule: SegmentationDataModule, devices: int) -> None:
    """With DDP each process trains on its share of the training images: every share must fill a batch, or a
    process has nothing to train on and no checkpoint is ever written."""
    if devices < 2:
        return
    images = datamodule.training_images()
    share, batch = -(-images // devices), datamodule.recipe.train.batch_size
    if share < batch:
        raise MedsegError(f"--devices {devices} gives each process {share} of the {images} training images, fewer "
                          f"than one batch (train.batch_size {batch}); use fewer --devices or a smaller "
                          "train.batch_size")


def build_module(recipe: Recipe) -> SegmentationModule:
    """The LightningModule, seeded by the recipe; its optimiser, schedule and freeze groups are tried once and the
    packages of the optional loggers looked for, so those mistakes stop training before the run folder exists."""
    L.seed_everything(recipe.train.seed, workers=True, verbose=False)
    module = SegmentationModule(recipe.to_dict())
    module.check_training_setup()
    check_loggers(recipe.train.loggers)
    check_training_sizes(recipe, module.model.card.size_multiple)
    return module


def check_training_sizes(recipe: Recipe, multiple: int) -> None:
    """data.size (and every multi-scale size, and data.crop) must be a multiple the network takes, or the first
    batch fails."""
    sizes = [*recipe.data.hw, *(recipe.data.multiscale or []), *(recipe.data.crop_hw or ())]
    bad = sorted({size for size in sizes if size % multiple})
    if bad:
        fitting = ", ".join(str(size - size % multiple or multiple) for size in bad)
        raise MedsegError(f"{recipe.model.name} takes sizes that are multiples of {multiple}, not {bad}; set "
                          f"data.size (and data.multiscale, data.crop) to multiples, e.g. {fitting}")


def choose_mode(recipe: Recipe, module: SegmentationModule) -> NumericMode:
    """`train.precision` resolved for this machine and network (medseg.engine.precision), applied to the module's
    memory format and said in the training header."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mode = choose_numeric_mode(recipe.train.precision, module.model.card, device_type)
    module.use_channels_last(mode.channels_last)
    say(f"precision: {mode.describe()}")
    return mode


def initialisation_notes(recipe: Recipe, module: SegmentationModule) -> tuple[Recipe, list[str]]:
    """(the recipe to train, warnings for the header and config.yaml) about initialisation the paper does not do:
    a network whose paper starts from pretrained weights (`card.paper_weights`) or a LossNet without its VGG-16
    file, at random init; and `train.freeze` on a network no file initialised, which is skipped: holding random
    weights fixed trains nothing in those epochs (a schedule that lowers the lr at the unfreeze then gives the
    still-random backbone only the small lr). Refusing instead would make the paper recipes unusable offline."""
    model, notes = module.model, []
    from_file = bool(model.load_reports)
    if model.card.paper_weights and not from_file:
        notes.append(f"{recipe.model.name} starts from random weights, the paper from {model.card.paper_weights}: "
                     "give it with model.encoder_weights=FILE or model.weights=FILE (`medseg weights list` says "
                     "which)")
    for index, term in enumerate(recipe.loss):
        if term.name == "lossnet" and not (term.model_extra or {}).get("vgg_weights"):
            notes.append(f"lossnet runs on a random VGG-16, the paper's is ImageNet-trained: give "
                         f"loss.{index}.vgg_weights=FILE (`medseg weights list`)")
    freeze = recipe.train.freeze
    if freeze is not None and not from_file:
        notes.append(f"train.freeze skipped: {', '.join(freeze.groups)} would be frozen at random init for "
                     f"{freeze.epochs} epochs, which trains nothing; they train from the first epoch (freeze a "
                     "pretrained backbone with model.encoder_weights=FILE)")
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"freeze": None})})
    for note in notes:
        say(f"warning: {note}")
    return recipe, notes


def load_initial_weights(module: SegmentationModule, recipe: Recipe) -> None:
    load_network_weights(module.model, recipe.model.weights)


def report_weights(module: SegmentationModule) -> list[dict]:
    """Print what every local weights file loaded (encoder, whole network, LossNet); the records go to config.yaml."""
    reports = module.weight_reports()
    for report in reports:
        say(report.summary())
    return [report.to_dict() for report in reports]


@rank_zero_only
def write_run_files(run: Run, datamodule: SegmentationDataModule, devices: int, weights: list[dict],
                    mode: NumericMode, notes: Sequence[str] = ()) -> None:
    """config.yaml (the resolved recipe and a `run:` record with the weight-loading reports, the initialisation
    warnings and the precision chosen; a resume keeps the record and notes the resume), splits.json, and
    amplify.json when the recipe amplifies."""
    recipe = datamodule.recipe
    config = recipe.to_dict()
    config["run"] = {"data": str(datamodule.root), "layout": datamodule.layout.kind, "splits": datamodule.split_source,
                     "seed": recipe.train.seed, "devices": devices, "created": now(), "versions": versions(),
                     "git_commit": git_commit(), "command": " ".join(["medseg", *sys.argv[1:]]) if sys.argv else None,
                     "weights": weights, "warnings": list(notes), "numeric": mode.to_dict()}
    if run.config_file.is_file():  # resuming: keep the original creation record, note the resume
        previous = run.config()["run"]
        config["run"] = {**previous, "resumed": [*previous.get("resumed", []), now()]}
        if previous.get("numeric") != mode.to_dict():  # e.g. resumed on another machine
            config["run"]["numeric_on_resume"] = mode.to_dict()
    write_text_atomic(run.config_file, yaml.safe_dump(config, sort_keys=False))
    write_text_atomic(run.splits_file, json.dumps(datamodule.splits, indent=1) + "\n")
    if datamodule.amplification is not None:
        write_text_atomic(run.path / "amplify.json", json.dumps(datamodule.amplification, indent=1) + "\n")


def fit(module: SegmentationModule, datamodule: SegmentationDataModule, run: Run, devices: int,
        callbacks: Sequence[L.Callback], progress: bool | None, resume: bool, mode: NumericMode) -> L.Trainer:
    recipe = datamodule.recipe
    trainer = build_trainer(recipe, run, mode, devices, callbacks, progress)
    say(f"training {recipe.name} on {datamodule.root} ({datamodule.counts()}) -> {run.path}")
    if datamodule.grouped_by:
        say(f"splits: {datamodule.split_source}")
    with children_join(run):
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(run.last_checkpoint) if resume else None)
    return trainer


def export(trainer: L.Trainer, run: Run, recipe: Recipe, data: Path) -> None:
    """Rank 0, after fit: model/ (what predict loads), curves.png, and the closing console line."""
    if not trainer.is_global_zero:
        return
    export_model(run, recipe, data)
    write_curves(run.metrics_file, run.path / "curves.png", recipe.train.monitor)
    best = trainer.checkpoint_callback.best_model_score
    say(f"finished epoch {trainer.current_epoch}/{recipe.train.epochs} in {trainer.world_size} process(es) "
        f"on {trainer.strategy.root_device.type}; best {recipe.train.monitor} "
        f"{float(best) if best is not None else float('nan'):.4f}")


@contextmanager
def children_join(run: Run) -> Iterator[None]:
    """While fitting, MEDSEG_RUN_DIR names the run folder, for the DDP child processes Lightning starts."""
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run.path.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def build_trainer(recipe: Recipe, run: Run, mode: NumericMode, devices: int = 1,
                  callbacks: Sequence[L.Callback] = (), progress: bool | None = None) -> L.Trainer:
    """The trainer factory: everything the loop needs comes from the recipe."""
    train = recipe.train
    checkpoint = ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor=train.monitor,
                                 mode=train.monitor_mode, save_top_k=1, auto_insert_metric_name=False,
                                 enable_version_counter=False)
    # last.ckpt at every epoch's end, from a callback of its own: Lightning >= 2.6 writes save_last's copy only in
    # epochs that improve the monitor, so it would be best.ckpt again (eval.checkpoint: last, resume)
    latest = ModelCheckpoint(dirpath=run.checkpoints, filename="last", save_top_k=1, enable_version_counter=False)
    show_bar = sys.stderr.isatty() if progress is None else progress
    loggers = build_loggers(train.loggers, run.path)
    table = next(logger for logger in loggers if isinstance(logger, EpochCSVLogger))
    all_callbacks: list[L.Callback] = [ResumeMetricsTable(table), LearningRateMonitor(logging_interval="epoch"),
                                       EpochSummary(progress_lines=not show_bar), FiniteLoss(), RandomStates(),
                                       *callbacks, checkpoint, latest]
    if train.freeze:
        all_callbacks.append(FreezeGroups(train.freeze.groups, train.freeze.epochs))
    if train.early_stopping:
        all_callbacks.append(EarlyStopping(train.monitor, patience=train.early_stopping.patience,
                                           min_delta=train.early_stopping.min_delta, mode=train.monitor_mode))
    if show_bar:
        all_callbacks.append(TQDMProgressBar())
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")
    return L.Trainer(
        max_epochs=train.epochs,
        accelerator="auto",
        devices=devices,
        # frozen groups take no gradient for a while: DDP must allow parameters without one
        strategy=("ddp_find_unused_parameters_true" if train.freeze else "ddp") if devices > 1 else "auto",
        precision=mode.precision,
        callbacks=all_callbacks,
        logger=loggers,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=train.gradient_clip,
        gradient_clip_algorithm=train.gradient_clip_algorithm,
        default_root_dir=run.path,
        log_every_n_steps=10,
    )


def quiet_lightning() -> None:
    """Keep the console to what matters: Lightning's info banners and tips, and warnings about things
    medseg chose on purpose (few loader workers on small CPUs), are silenced; real warnings stay."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r"lossnet: no vgg_weights")  # the training header says it
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")  # resume
    warnings.filterwarnings("ignore", message=r".*The number of training batches .* is smaller than the logging "
                                              r"interval.*")


def export_model(run: Run, recipe: Recipe, data: Path) -> Path:
    """Write run/model/ from best.ckpt (or last.ckpt, as eval.checkpoint says): what predict loads."""
    best = recipe.eval.checkpoint == "best" and run.best_checkpoint.is_file()
    chosen = run.best_checkpoint if best else run.last_checkpoint
    state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
    module = SegmentationModule(recipe.to_dict())
    module.load_state_dict(state)
    slicing = slicing_record(data)
    extra = {
        "paper": model_info(recipe.model.name).paper,
        "size_multiple": model_info(recipe.model.name).size_multiple,
        "preprocessing": preprocessing_of(recipe).to_dict(),
        # the recipe's eval.tiling: predict and evaluate tile this way unless told otherwise (engine.inference)
        **({"tiling": recipe.eval.tiling.model_dump(mode="json")} if recipe.eval.tiling else {}),
        "mask_threshold": recipe.data.mask_threshold,
        "recipe": recipe.name,
        "checkpoint": chosen.name,
        "trained_on": str(data),
        # slices from `medseg slices`: how they were cut, so predict slices a new volume the same way
        **({"slicing": slicing} if slicing else {}),
    }
    return save_model(module.model, run.model_dir, extra=extra)
