"""`medseg benchmark`: cost of registered networks, measured, not estimated.

Per model (random init, eval mode): parameters; FLOPs of one forward pass of one image from
torch.utils.flop_counter (GMACs = GFLOPs / 2, labelled as such); latency at batch 1 and at batch N
(median of `repeats` timed runs after `warmup` untimed ones), throughput in images/s; peak memory
(CUDA: max allocated; CPU: the process's peak resident set size during the model's runs, Linux).
With pruning levels (ANU-Net L1..L4) each level is a row; `benchmark_run` measures a trained run's
levels and, given data, adds each level's Dice and IoU (ANU-Net Table 6).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from medseg.engine.evaluate import evaluate
from medseg.engine.inference import pick_device, prune_to
from medseg.engine.run import versions
from medseg.errors import MedsegError
from medseg.files import user_write_errors, write_text_atomic
from medseg.models import create_model, load_model
from medseg.models.saving import read_model_config


def count_flops(model: torch.nn.Module, example: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def benchmark_network(model: torch.nn.Module, label: str, size: tuple[int, int], batch: int = 8, device: str = "auto",
                      warmup: int = 3, repeats: int = 10, amp: bool = False) -> dict[str, Any]:
    """Cost and speed of one network (eval mode, no gradients) at `size`."""
    dev = pick_device(device)
    model = model.eval().to(dev)
    in_channels = model.spec.in_channels
    params = sum(p.numel() for p in model.parameters())
    one = torch.randn(1, in_channels, *size, device=dev)
    flops = count_flops(model, one)
    many = torch.randn(batch, in_channels, *size, device=dev)

    def run(x: torch.Tensor) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad(), torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                return model(x)
        return call

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss_reset = dev.type == "cpu" and _reset_peak_rss()
    latency_1 = timed(run(one), dev, warmup, repeats)
    latency_n = timed(run(many), dev, warmup, repeats)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        peak_kind = "cuda max allocated"
    else:
        peak = _peak_rss_mb() if rss_reset else None
        peak_kind = "process peak RSS"
    return {
        "model": label, "input": f"{in_channels}x{size[0]}x{size[1]}", "params": params,
        "gflops": flops / 1e9, "gmacs": flops / 2e9,
        "latency_ms_b1": latency_1 * 1e3, "throughput_b1": 1 / latency_1,
        "batch": batch, "latency_ms_bn": latency_n * 1e3, "throughput_bn": batch / latency_n,
        "peak_memory_mb": peak, "peak_memory_kind": peak_kind,
    }


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'stsnet:decoder=unet:attention=none' -> ('stsnet', {'decoder': 'unet', 'attention': 'none'})."""
    name, *options = spec.split(":")
    kwargs = {}
    for option in options:
        if "=" not in option:
            raise MedsegError(f"model spec {spec!r}: options are key=value after the name, e.g. stsnet:decoder=unet")
        key, value = option.split("=", 1)
        kwargs[key] = yaml.safe_load(value)
    return name, kwargs


def benchmark_model(spec: str, size: tuple[int, int], batch: int = 8, device: str = "auto", warmup: int = 3,
                    repeats: int = 10, in_channels: int = 3, num_classes: int = 1, amp: bool = False,
                    level: int | None = None) -> dict[str, Any]:
    """A registered network (`name` or `name:option=value:...`) at random initialisation, pruned to `level`
    when given (ANU-Net L_N)."""
    name, options = parse_model_spec(spec)
    model = prune_to(create_model(name, in_channels, num_classes, **options), level)
    label = spec if level is None else f"{spec} L{level}"
    return benchmark_network(model, label, size, batch, device, warmup, repeats, amp)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **versions()}


def benchmark(models: list[str], size: tuple[int, int], batch: int = 8, device: str = "auto", warmup: int = 3,
              repeats: int = 10, in_channels: int = 3, num_classes: int = 1, amp: bool = False,
              levels: list[int] | None = None,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Benchmark registered networks (each pruning level of each, with `levels`)."""
    results = []
    for name in models:
        for level in levels or [None]:
            result = benchmark_model(name, size, batch, device, warmup, repeats, in_channels, num_classes, amp, level)
            results.append(result)
            if on_result:
                on_result(result)
    return _report(results, size, batch, device, warmup, repeats, amp)


def benchmark_run(run: str | Path, levels: list[int | None], size: tuple[int, int] | None = None,
                  data: str | Path | None = None, batch: int = 8, device: str = "auto", warmup: int = 3,
                  repeats: int = 10, amp: bool = False,
                  on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """A trained run at each pruning level (ANU-Net Table 6): cost and speed, and with `data` the Dice and
    IoU of each level on it (its test split when it is the run's own data), from `medseg evaluate`."""
    config = read_model_config(run)
    size = size or tuple(config["preprocessing"]["size"])
    results = []
    for level in levels:
        label = config["name"] if level is None else f"{config['name']} L{level}"
        result = benchmark_network(prune_to(load_model(run), level), label, size, batch, device, warmup, repeats, amp)
        if data is not None:
            folder = evaluate(run, data, device=device, overlays=0, level=level)
            summary = json.loads((folder / "summary.json").read_text())
            result.update(protocol=summary["protocol"]["name"], cases=summary["cases"],
                          dice=summary["metrics"]["dice"]["value"], iou=summary["metrics"]["iou"]["value"])
        results.append(result)
        if on_result:
            on_result(result)
    return {**_report(results, size, batch, device, warmup, repeats, amp), "run": str(Path(run).resolve()),
            "data": str(Path(data).resolve()) if data else None}


def _report(results: list[dict[str, Any]], size: tuple[int, int], batch: int, device: str, warmup: int,
            repeats: int, amp: bool) -> dict[str, Any]:
    return {"date": date.today().isoformat(), "device": str(pick_device(device)), "amp": amp, "machine": machine(),
            "size": list(size), "batch": batch, "warmup": warmup, "repeats": repeats, "results": results}


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """The report as JSON, whole or not at all; a full disk or a read-only place is one line (`--json`'s path was
    checked before the measurements, but a disk can fill meanwhile)."""
    with user_write_errors():
        write_text_atomic(Path(path), json.dumps(report, indent=2) + "\n")


def markdown_table(report: dict[str, Any]) -> str:
    scored = any("dice" in r for r in report["results"])
    head = ("| model | input | params | GFLOPs | GMACs | latency b1 (ms) | img/s b1 | "
            f"latency b{report['batch']} (ms) | img/s b{report['batch']} | peak mem (MB) |")
    head += " Dice | IoU |" if scored else ""
    lines = [head, "|" + "---|" * (12 if scored else 10)]
    for r in report["results"]:
        peak = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        line = (f"| {r['model']} | {r['input']} | {r['params']:,} | {r['gflops']:.2f} | {r['gmacs']:.2f} | "
                f"{r['latency_ms_b1']:.1f} | {r['throughput_b1']:.2f} | {r['latency_ms_bn']:.1f} | "
                f"{r['throughput_bn']:.2f} | {peak} |")
        if scored:
            line += f" {r['dice']:.4f} | {r['iou']:.4f} |"
        lines.append(line)
    return "\n".join(lines)
