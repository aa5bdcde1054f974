"""`medseg train`: data check, splits, run folder, Lightning trainer, export of the model folder.

The trainer factory turns a recipe into a `lightning.Trainer`: AMP on CUDA, DDP for `devices > 1`
(gloo processes on CPU), `best.ckpt` by the recipe's monitor and `last.ckpt`, early stopping, a
progress bar on terminals. `--resume` continues a run from `last.ckpt` with its optimiser, schedule
and epoch counter.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from torch.utils.data import DataLoader

from medseg.config import NormalizeStats, Recipe
from medseg.data.amplify import AmplifiedCase, Thresholds
from medseg.data.amplify import manifest as amplify_manifest
from medseg.data.amplify import plan as plan_amplification
from medseg.data.check import check_data
from medseg.data.dataset import MultiScaleCollate, SegmentationDataset, intensity_statistics
from medseg.data.formats import Layout, discover
from medseg.data.splits import cases_for, make_splits
from medseg.data.transforms import Preprocessing
from medseg.engine.callbacks import EpochMetrics, FreezeGroups
from medseg.engine.module import SegmentationModule
from medseg.engine.run import Run, git_commit, latest_run_dir, new_run_dir, now, slug, versions, write_text_atomic
from medseg.errors import MedsegError
from medseg.models import save_model
from medseg.models.registry import model_info
from medseg.models.saving import load_weights_file

# Lightning's DDP launcher re-runs the command line in child processes; they must join rank 0's run
# folder instead of naming a new one.
RUN_DIR_ENV = "MEDSEG_RUN_DIR"


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def preprocessing_of(recipe: Recipe) -> Preprocessing:
    return Preprocessing(size=recipe.data.hw, in_channels=recipe.model.in_channels, normalize=_plain(recipe.data.normalize))


def _plain(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


def precision_of(recipe: Recipe) -> str:
    if recipe.train.precision != "auto":
        return "32-true" if recipe.train.precision == "32" else recipe.train.precision
    return "16-mixed" if torch.cuda.is_available() else "32-true"


def check_before_training(layout: Layout, recipe: Recipe) -> None:
    """Refuse a folder with any error (the whole folder, not only the split: a missing mask is a mistake)."""
    report = check_data(layout.root, recipe.model.num_classes, recipe.data.mask_threshold)
    if report.errors:
        first = report.errors[0]
        raise MedsegError(f"{layout.root}: {first.file}: {first.message} — run `medseg check-data {layout.root}` "
                          f"to see all {len(report.errors)} problem(s)")


def data_loaders(layout: Layout, splits: dict[str, list[str]], recipe: Recipe,
                 views: Sequence[AmplifiedCase] = ()) -> tuple[DataLoader, DataLoader]:
    prep = preprocessing_of(recipe)
    common = {"preprocessing": prep, "num_classes": recipe.model.num_classes, "mask_threshold": recipe.data.mask_threshold}
    train_set = SegmentationDataset([*cases_for(layout, splits["train"]), *views], augment=recipe.data.augment, **common)
    val_set = SegmentationDataset(cases_for(layout, splits["val"]), **common)
    if not len(val_set):
        raise MedsegError("the validation split is empty; set data.split.val > 0 or list val stems in splits.json")
    workers = recipe.data.num_workers if recipe.data.num_workers is not None else default_workers()
    loader = {"num_workers": workers, "persistent_workers": workers > 0, "pin_memory": torch.cuda.is_available()}
    batch = recipe.train.batch_size
    collate = MultiScaleCollate(recipe.data.multiscale) if recipe.data.multiscale else None
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=len(train_set) > batch,
                              collate_fn=collate, **loader)
    val_loader = DataLoader(val_set, batch_size=batch, shuffle=False, **loader)
    return train_loader, val_loader


def build_trainer(recipe: Recipe, run: Run, devices: int = 1, callbacks: Sequence[L.Callback] = (),
                  progress: bool | None = None) -> L.Trainer:
    """The trainer factory: everything the loop needs comes from the recipe."""
    train = recipe.train
    checkpoint = ModelCheckpoint(dirpath=run.checkpoints, filename="best", monitor=train.monitor, mode=train.monitor_mode,
                                 save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False)
    show_bar = sys.stderr.isatty() if progress is None else progress
    all_callbacks: list[L.Callback] = [EpochMetrics(run.metrics_file, echo_progress=not show_bar), *callbacks, checkpoint]
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
        precision=precision_of(recipe),
        callbacks=all_callbacks,
        logger=False,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=train.gradient_clip,
        default_root_dir=run.path,
        log_every_n_steps=10,
    )


def quiet_lightning() -> None:
    """Keep the console to what matters: Lightning's info banners and tips, and warnings about things
    medseg chose on purpose (few loader workers on small CPUs), are silenced; real warnings stay."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")  # resume
    warnings.filterwarnings("ignore", message=r".*The number of training batches .* is smaller than the logging interval.*")


def _rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) + int(os.environ.get("NODE_RANK", "0"))


def resolve_run(recipe: Recipe, data: Path, out: Path, name: str | None, resume: bool) -> Run:
    if _rank() > 0 and os.environ.get(RUN_DIR_ENV):
        return Run(os.environ[RUN_DIR_ENV])
    base = name or f"{slug(recipe.name)}-{slug(data.name)}"
    if resume:
        path = out / name if name else latest_run_dir(out, base)
        if path is None or not (path / "checkpoints" / "last.ckpt").is_file():
            raise MedsegError(f"nothing to resume: no {out / base}*/checkpoints/last.ckpt; train first or pass --name")
        return Run(path)
    if name and (out / name).exists():
        raise MedsegError(f"run folder {out / name} exists; choose another --name, or add --resume to continue it")
    return Run(new_run_dir(out, base))


def train(recipe: Recipe, data: str | Path, out: str | Path = "runs", name: str | None = None, devices: int = 1,
          resume: bool = False, overrides: Sequence[str] = (), callbacks: Sequence[L.Callback] = (),
          progress: bool | None = None) -> Run:
    """Train `recipe` on the folder `data`; returns the run. With `resume`, the run's stored recipe is
    used (with `overrides` applied on top, e.g. more epochs) and training continues from last.ckpt."""
    quiet_lightning()
    data, out = Path(data).resolve(), Path(out)
    run = resolve_run(recipe, data, out, name, resume)
    if resume:
        stored = run.config()["run"]
        if Path(stored["data"]) != data:
            raise MedsegError(f"{run.path} was trained on {stored['data']}, not {data}; resume with the same --data")
        recipe = run.recipe(overrides)
    layout = discover(data)
    splits, source = (run.splits(), "run splits.json") if resume else make_splits(layout, **recipe.data.split.model_dump())
    check_before_training(layout, recipe)
    if recipe.data.normalize == "dataset":
        recipe = with_dataset_statistics(recipe, layout, splits["train"])
    L.seed_everything(recipe.train.seed, workers=True, verbose=False)
    module = SegmentationModule(recipe.to_dict())
    if recipe.model.weights and not resume:
        report = load_weights_file(module.model, recipe.model.weights)
        print(f"initialised {len(report['loaded'])} tensors from {recipe.model.weights} "
              f"({len(report['missing'])} left at random init, {len(report['unexpected'])} unused)")
    if _rank() == 0:
        os.environ[RUN_DIR_ENV] = str(run.path.resolve())
        _write_run_files(run, recipe, data, layout, splits, source, devices)
    views = amplified_views(run, layout, splits, recipe) if recipe.data.amplify else []
    train_loader, val_loader = data_loaders(layout, splits, recipe, views)
    trainer = build_trainer(recipe, run, devices, callbacks, progress)
    if _rank() == 0:
        print(f"training {recipe.name} on {data} ({len(splits['train'])} train / {len(splits['val'])} val / "
              f"{len(splits['test'])} test) -> {run.path}", flush=True)
    trainer.fit(module, train_loader, val_loader, ckpt_path=str(run.last_checkpoint) if resume else None)
    if trainer.is_global_zero:
        export_model(run, recipe, data)
        best = trainer.checkpoint_callback.best_model_score
        print(f"finished epoch {trainer.current_epoch}/{recipe.train.epochs} in {trainer.world_size} process(es) "
              f"on {trainer.strategy.root_device.type}; best {recipe.train.monitor} "
              f"{float(best) if best is not None else float('nan'):.4f}", flush=True)
    return run


def with_dataset_statistics(recipe: Recipe, layout: Layout, train_stems: list[str]) -> Recipe:
    """Replace `data.normalize: dataset` by the training split's {mean, std}, so the run's config.yaml and
    model carry the numbers and evaluate / predict z-score new images exactly as training did."""
    raw = Preprocessing(size=recipe.data.hw, in_channels=recipe.model.in_channels, normalize="none")
    mean, std = intensity_statistics(cases_for(layout, train_stems), raw)
    if std <= 0:
        raise MedsegError(f"{layout.root}: the training images are all one intensity (std 0); "
                          "data.normalize: dataset cannot z-score them, choose another normalisation")
    if _rank() == 0:
        print(f"normalisation: training split mean {mean:.4f}, std {std:.4f} (stored in the run)", flush=True)
    stats = NormalizeStats(mean=[mean], std=[std])
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"normalize": stats})})


def amplified_views(run: Run, layout: Layout, splits: dict[str, list[str]], recipe: Recipe) -> list[AmplifiedCase]:
    """STS-Net amplification of the training split only; the plan goes to RUN/amplify.json."""
    cfg = recipe.data.amplify
    given = Thresholds(cfg.n1, cfg.n2, None, None, "given in the recipe") if cfg.n2 is not None else None
    thresholds, views, lesions = plan_amplification(layout, splits["train"], given, recipe.model.num_classes,
                                                    recipe.data.mask_threshold, cfg.seed, cfg.border)
    if _rank() == 0:
        write_text_atomic(run.path / "amplify.json", json.dumps(amplify_manifest(thresholds, views, lesions, cfg.seed, cfg.border), indent=1) + "\n")
        print(f"amplification: N1 {thresholds.n1}, N2 {thresholds.n2}; {len({v.case.stem for v in views})} of "
              f"{len(splits['train'])} training images qualify, {len(views)} views added", flush=True)
    return views


def _write_run_files(run: Run, recipe: Recipe, data: Path, layout: Layout, splits: dict[str, list[str]],
                     source: str, devices: int) -> None:
    config = recipe.to_dict()
    config["run"] = {"data": str(data), "layout": layout.kind, "splits": source, "seed": recipe.train.seed,
                     "devices": devices, "created": now(), "versions": versions(), "git_commit": git_commit(),
                     "command": " ".join(["medseg", *sys.argv[1:]]) if sys.argv else None}
    if run.config_file.is_file():  # resuming: keep the original creation record, note the resume
        previous = yaml.safe_load(run.config_file.read_text()).get("run", {})
        config["run"] = {**previous, "resumed": [*previous.get("resumed", []), now()]}
    write_text_atomic(run.config_file, yaml.safe_dump(config, sort_keys=False))
    write_text_atomic(run.splits_file, json.dumps(splits, indent=1) + "\n")


def export_model(run: Run, recipe: Recipe, data: Path) -> Path:
    """Write run/model/ from best.ckpt (or last.ckpt, as eval.checkpoint says): what predict loads."""
    chosen = run.best_checkpoint if recipe.eval.checkpoint == "best" and run.best_checkpoint.is_file() else run.last_checkpoint
    state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
    module = SegmentationModule(recipe.to_dict())
    module.load_state_dict(state)
    extra = {
        "paper": model_info(recipe.model.name).paper,
        "size_multiple": model_info(recipe.model.name).size_multiple,
        "preprocessing": preprocessing_of(recipe).to_dict(),
        "mask_threshold": recipe.data.mask_threshold,
        "recipe": recipe.name,
        "checkpoint": chosen.name,
        "trained_on": str(data),
    }
    return save_model(module.model, run.model_dir, extra=extra)
