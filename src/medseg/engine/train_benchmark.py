"""`medseg benchmark --train`: training throughput inside medseg's engine against a bare PyTorch loop.

For each network and precision, the same network, loss (the recipe's, the network's extra losses included),
optimiser and tensors are trained twice:

- engine: `build_trainer` (the real trainer of `medseg train`, with its callbacks and loggers, in a temporary
  run folder) fitting a `SegmentationModule`, fed by a DataLoader of ready batches; a step is the time from one
  training batch's start to the next one's, so the loader, the callbacks and the logging count;
- bare: `for batch: SegmentationModule.training_loss, zero_grad, backward, step` under the same autocast and
  memory format (the same loss terms as `training_step`, without Lightning, callbacks or logging).

Both take the median over `steps` timed steps after `warmup` untimed ones, pooled over `rounds` rounds run
in the order engine, bare | bare, engine | ... (ABBA): on a shared or thermally drifting machine the same
loop's step time moves by 10-20 % within minutes, and alternating the order keeps that drift out of the
ratio. `ratio` = engine / bare throughput (1.0 = the engine costs nothing).

Data: synthetic batches (random images, random binary or label masks) of the recipe's size by default. With `data`
(a folder `medseg train` accepts), the engine is fed by the real training loader of `medseg train` (splits,
decoded-data cache, augmentation, loader workers), and the bare loop trains on batches drawn from that loader
beforehand and held in memory: the ratio then charges the engine with everything an epoch costs besides compute.
The decoded-data cache is filled before timing (the steady state of the second and later epochs; `cache_fill_s`
says what the first epoch pays once). The recipe is the network's own (`recipes/<name>.yaml`), or the `unet` recipe
with the network swapped in for a network without one; multi-scale training is switched off so every step has the
same size.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from medseg.config import Recipe, assign, list_recipes, read_recipe_yaml, validate_recipe
from medseg.engine.allocator import tune_allocator
from medseg.engine.benchmark import count_flops, machine, parse_model_spec
from medseg.engine.data import SegmentationDataModule
from medseg.engine.inference import pick_device
from medseg.engine.module import SegmentationModule
from medseg.engine.optim import build_optimizer
from medseg.engine.precision import NumericMode, choose_numeric_mode
from medseg.engine.run import Run
from medseg.engine.train import build_trainer, quiet_lightning


def benchmark_recipe(spec: str, size: int, batch: int, precision: str, in_channels: int) -> Recipe:
    """The network's recipe at `size` and `batch`, single-scale, with `precision`; options from the spec."""
    name, options = parse_model_spec(spec)
    recipe_name = name if name in list_recipes() else "unet"
    _, raw = read_recipe_yaml(recipe_name)
    raw["model"] = {"name": name, "in_channels": in_channels, "num_classes": raw["model"].get("num_classes", 1),
                    **({k: v for k, v in raw["model"].items() if k not in ("name", "in_channels", "num_classes")}
                       if recipe_name == name else {}), **options}
    for key, value in {"data.size": size, "data.multiscale": None, "train.batch_size": batch,
                       "train.precision": precision, "train.epochs": 1, "train.loggers": ["csv"],
                       "train.early_stopping": None}.items():
        assign(raw, key, value)
    return validate_recipe(recipe_name, raw)


def synthetic_batches(recipe: Recipe, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    height, width = recipe.data.hw
    channels, classes = recipe.model.in_channels, recipe.model.num_classes
    batches = []
    for _ in range(count):
        images = torch.randn(recipe.train.batch_size, channels, height, width, generator=generator)
        masks = torch.randint(0, max(2, classes), (recipe.train.batch_size, height, width), generator=generator)
        batches.append({"image": images, "mask": masks})
    return batches


class StepClock(L.Callback):
    """Start times of the training batches (and the end of the last): start-to-start intervals include the
    loader, the callbacks and the logging."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        _synchronize(module.device)
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _synchronize(module.device)
        self.end = time.perf_counter()

    def step_seconds(self, warmup: int) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks, marks[1:])][warmup:]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_steps(recipe: Recipe, mode: NumericMode, batches: list[dict[str, torch.Tensor]], warmup: int,
                 device: torch.device, loader: DataLoader | None = None) -> list[float]:
    """Seconds per step of `medseg train`'s trainer on the batches (one epoch, a one-batch validation), or
    on the first len(batches) batches of `loader`."""
    L.seed_everything(recipe.train.seed, verbose=False)
    module = SegmentationModule(recipe.to_dict())
    module.use_channels_last(mode.channels_last)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="medseg-train-benchmark-") as folder:
        run = Run(Path(folder))
        run.path.mkdir(parents=True, exist_ok=True)
        trainer = build_trainer(recipe, run, mode, devices=1, callbacks=[clock], progress=False)
        trainer.limit_train_batches = len(batches)
        loader = loader or DataLoader(batches, batch_size=None, shuffle=False)
        with contextlib.redirect_stdout(io.StringIO()):  # the epoch lines of `medseg train`
            trainer.fit(module, train_dataloaders=loader, val_dataloaders=DataLoader(batches[:1], batch_size=None))
    return clock.step_seconds(warmup)


def bare_steps(recipe: Recipe, mode: NumericMode, batches: list[dict[str, torch.Tensor]], warmup: int,
               device: torch.device) -> list[float]:
    """Seconds per step of a plain loop: the same network, loss, optimiser, autocast and memory format."""
    torch.manual_seed(recipe.train.seed)
    module = SegmentationModule(recipe.to_dict()).to(device).train()
    module.use_channels_last(mode.channels_last)
    optimizer = build_optimizer(module.model, recipe.optim)
    dtype = mode.autocast_dtype
    scaler = torch.amp.GradScaler(device.type, enabled=mode.precision == "16-mixed")
    times = []
    for batch in batches:
        batch = {"image": batch["image"].to(device), "mask": batch["mask"].to(device)}
        _synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = module.training_loss(batch)  # the engine's own loss, without Lightning around it
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return times[warmup:]


class FolderBatches:
    """The training loader of `medseg train` on a data folder, with its decoded-data cache filled."""

    def __init__(self, recipe: Recipe, data: Path):
        self.module = SegmentationDataModule(recipe, data)
        self.module.setup("fit")
        start = time.perf_counter()
        if self.module.train_set is not None:
            self.module.train_set.fill_cache()
        self.cache_fill_s = time.perf_counter() - start
        self.loader = self.module.train_dataloader()

    def batches(self, count: int) -> list[dict[str, torch.Tensor]]:
        """`count` batches of the loader (one pass, repeated if the split is shorter), images and masks only."""
        drawn: list[dict[str, torch.Tensor]] = []
        while len(drawn) < count:
            for batch in self.loader:
                drawn.append({"image": batch["image"], "mask": batch["mask"]})
                if len(drawn) == count:
                    break
        return drawn


def benchmark_training(models: list[str], size: int = 128, batch: int = 8, device: str = "auto",
                       precisions: tuple[str, ...] = ("32", "bf16-mixed"), warmup: int = 2, steps: int = 6,
                       in_channels: int = 3, data: Path | None = None, rounds: int = 2,
                       on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Engine and bare-loop training throughput per network and precision (see the module docstring)."""
    quiet_lightning()
    tune_allocator()  # as `medseg train` does; both loops run in this process
    dev = pick_device(device)
    results = []
    for spec in models:
        for precision in precisions:
            recipe = benchmark_recipe(spec, size, batch, precision, in_channels)
            folder = FolderBatches(recipe, data) if data is not None else None
            if folder is not None:
                recipe = folder.module.recipe  # data.normalize: dataset resolved on the training split
            probe = SegmentationModule(recipe.to_dict())
            mode = choose_numeric_mode(precision, probe.model.card, dev.type)
            params = sum(p.numel() for p in probe.model.parameters())
            flops = count_flops(probe.model.eval(), torch.randn(1, in_channels, size, size))
            batches = synthetic_batches(recipe, warmup + steps) if folder is None else folder.batches(warmup + steps)
            loader = folder.loader if folder is not None else None
            timed: dict[str, list[float]] = {"engine": [], "bare": []}
            for round_index in range(rounds):
                for kind in ("engine", "bare") if round_index % 2 == 0 else ("bare", "engine"):
                    timed[kind] += (engine_steps(recipe, mode, batches, warmup, dev, loader=loader) if kind == "engine"
                                    else bare_steps(recipe, mode, batches, warmup, dev))
            engine, bare = statistics.median(timed["engine"]), statistics.median(timed["bare"])
            result = {"model": spec, "input": f"{in_channels}x{size}x{size}", "params": params,
                      "gflops": flops / 1e9, "gmacs": flops / 2e9, "batch": batch, "precision": mode.precision,
                      "memory_format": "channels_last" if mode.channels_last else "contiguous",
                      "mode": mode.describe(), "recipe": recipe.name, "train_img_s": batch / engine,
                      "raw_img_s": batch / bare, "ratio": bare / engine,
                      "engine_step_s": engine, "bare_step_s": bare, "rounds": rounds,
                      "data": str(data) if data is not None else "synthetic",
                      "loader_workers": folder.loader.num_workers if folder is not None else 0,
                      "cache_fill_s": folder.cache_fill_s if folder is not None else None}
            results.append(result)
            if on_result:
                on_result(result)
    return {"date": date.today().isoformat(), "device": str(dev), "machine": machine(), "size": [size, size],
            "batch": batch, "warmup": warmup, "steps": steps, "rounds": rounds, "results": results}


def training_markdown(report: dict[str, Any]) -> str:
    lines = ["| model | precision | memory format | engine img/s | bare loop img/s | engine / bare |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['precision']} | {r['memory_format']} | {r['train_img_s']:.2f} | "
                     f"{r['raw_img_s']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)
