"""`medseg benchmark fovea-pool`: what Fovea-UNet's own operators cost (Liu et al., "Fovea-UNet: detection and
segmentation of lymph node metastases in colorectal cancer with deep learning", BioMedical Engineering OnLine
2023). The paper names the importance modules and the pooling radius as the network's computational burden
("Limitation and future work"); this measures both: Fovea Pooling against the per-pixel loop of its definition
(speed and the largest difference), and the share of a `fovea_unet` forward pass spent in the importance
modules and in the pooling.
"""

from __future__ import annotations

import time
from datetime import date
from typing import Any, Callable

import torch

from medseg.engine.benchmark import machine, timed
from medseg.engine.inference import pick_device
from medseg.models import create_model
from medseg.models.fovea_pooling import fovea_pool, fovea_pool_loop
from medseg.models.fovea_unet import FoveaSkip


def benchmark_fovea_pool(channels: int = 16, size: int = 128, max_radius: int = 16, network_size: int = 512,
                         device: str = "auto", warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Fovea-UNet's expensive parts: Fovea Pooling (summed-area table + gathers, soft and hard) against the
    per-pixel loop of Eq. 6-7 on a channels x size x size map, and the share of `fovea_unet`'s forward time at
    network_size px spent in the importance modules and in the pooling."""
    dev = pick_device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, size, size, generator=generator).to(dev)
    importance = torch.rand(1, 1, size, size, generator=generator).to(dev)
    with torch.no_grad():
        fast_hard = timed(lambda: fovea_pool(x, importance, max_radius, "avg", hard=True), dev, warmup, repeats)
        fast_soft = timed(lambda: fovea_pool(x, importance, max_radius, "lp"), dev, warmup, repeats)
        start = time.perf_counter()
        reference = fovea_pool_loop(x.cpu(), importance.cpu(), max_radius, "avg", hard=True)
        loop = time.perf_counter() - start
        fast = fovea_pool(x, importance, max_radius, "avg", hard=True).cpu().double()
        error = float((fast - reference.double()).abs().max())

    model = create_model("fovea_unet", 3, 1).to(dev).eval()
    spent = {"importance": 0.0, "pooling": 0.0}
    starts: dict[int, float] = {}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def before(module: torch.nn.Module, args: Any) -> None:
        sync()
        starts[id(module)] = time.perf_counter()

    def after(kind: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            sync()
            spent[kind] += time.perf_counter() - starts[id(module)]
        return hook

    for skip in (m for m in model.modules() if isinstance(m, FoveaSkip)):
        for kind, part in (("importance", skip.importance), ("pooling", skip.pool)):
            part.register_forward_pre_hook(before)
            part.register_forward_hook(after(kind))
    image = torch.randn(1, 3, network_size, network_size, generator=generator).to(dev)
    with torch.no_grad():
        model(image)  # warm-up
        spent.update(importance=0.0, pooling=0.0)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            model(image)
        sync()
        total = (time.perf_counter() - start) / repeats
    return {
        "device": str(dev), "machine": machine(), "date": date.today().isoformat(),
        "map": f"{channels}x{size}x{size}", "max_radius": max_radius,
        "fovea_pool_hard_avg_ms": fast_hard * 1e3, "fovea_pool_soft_lp_ms": fast_soft * 1e3,
        "loop_hard_avg_s": loop, "speedup": loop / fast_hard, "max_abs_difference": error,
        "network_input": f"3x{network_size}x{network_size}", "forward_ms": total * 1e3,
        "importance_share": spent["importance"] / repeats / total,
        "pooling_share": spent["pooling"] / repeats / total,
    }
