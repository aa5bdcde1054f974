"""`medseg export`: a saved network as one ONNX or TorchScript file plus `medseg-export.json`, the sidecar that says
how to feed it (size, channels, normalisation with its numbers, size multiple), what it returns, where it came
from and how well it matched PyTorch.

Choices where the issue and the libraries leave room (ours):
- The exported graph maps normalised images to probabilities: the activation (sigmoid for one output channel,
  softmax over channels otherwise, `medseg.engine.module.activate`) is inside it, so the file is self-contained
  and a deployment thresholds its output directly. It is exported in eval mode and fp32 with one output, the main
  prediction: in eval mode every medseg network returns one tensor (deep-supervision heads and Fovea-UNet's
  nHSIC are training-only, `medseg.models.base`); an export that sees anything else refuses.
- The batch dimension is always dynamic (predict batches images); height and width only with `dynamic`. A fixed
  export takes the training size padded to the network's size multiple, which is what predict feeds by default.
- ONNX: `torch.onnx.export(dynamo=True)` first (torch's default exporter); when it fails for a network, the
  TorchScript-based exporter (`dynamo=False`); `exporter` forces either. The sidecar records which one wrote the
  file. TorchScript: `torch.jit.trace` of the eval-mode network.
- Parity, before anything is written: the exported file (onnxruntime's CPU provider; `torch.jit.load`) and PyTorch
  on the same inputs, compared on probabilities with |a - b| <= ATOL + RTOL * |b|. Probabilities, not logits: they
  are what is thresholded, and a random-init M2SNet's logits reach 1e10, where no absolute tolerance means
  anything while the sigmoid is saturated. ATOL 1e-4 moves a decision only for pixels within 1e-4 of the
  threshold. The inputs are the run's validation (else test, else training) images when the run folder and its
  data folder are at hand, otherwise seeded standard-normal inputs (what normalised images look like); batch 2
  at the export size, and with `dynamic` also at one size multiple more in each direction.
- The output folder is written whole (`medseg.files.atomic_folder`) and only after parity passes; an existing
  folder is replaced only when it is an earlier export (it holds `medseg-export.json`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.data.transforms import IMAGENET_GRAY, IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from medseg.engine.inference import Tiling, prune_to, stored_tiling
from medseg.engine.module import activate
from medseg.engine.onnx_predictor import INPUT_NAME, OUTPUT_NAME, SIDECAR, SIDECAR_FORMAT, import_onnxruntime
from medseg.engine.run import Run, now
from medseg.errors import MedsegError
from medseg.files import atomic_folder, check_output_folder
from medseg.models import load_model
from medseg.models.base import SegmentationNetwork
from medseg.models.saving import model_folder, read_model_config, read_threshold

FORMATS = ("onnx", "torchscript")
EXPORTERS = ("auto", "dynamo", "torchscript")  # ONNX exporters: auto = dynamo, else the TorchScript-based one
FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
RTOL, ATOL = 1e-3, 1e-4
PARITY_IMAGES = 2


class _Probabilities(nn.Module):
    """The network followed by its activation: what the exported graph computes."""

    def __init__(self, network: SegmentationNetwork):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.network(image)
        if not isinstance(logits, torch.Tensor):  # the contract says one tensor in eval mode
            raise MedsegError(f"network {self.network.spec.name!r} returns {type(logits).__name__} in eval mode, not "
                              "one tensor; it cannot be exported")
        return activate(logits)


def normalisation_values(prep: Preprocessing) -> dict[str, Any]:
    """The normalisation as numbers a deployment applies: {mode, mean, std} (mean/std null for `none` and
    `per_image`, which subtracts each image's own mean and divides by its own std)."""
    norm = prep.normalize
    if norm == "imagenet":
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if prep.in_channels == 3 else ([IMAGENET_GRAY[0]],
                                                                                  [IMAGENET_GRAY[1]])
        return {"mode": "imagenet", "mean": list(mean), "std": list(std)}
    if isinstance(norm, dict):
        return {"mode": "mean_std", "mean": list(norm["mean"]), "std": list(norm["std"])}
    return {"mode": norm, "mean": None, "std": None}


def export_size(prep: Preprocessing, multiple: int, tiling: Tiling | None = None) -> tuple[int, int]:
    """What predict feeds a fixed export, padded up to the size multiple: the tile of a network that predicts in
    tiles by default (trained on crops, or `eval.tiling`), else the training size."""
    return tuple(-(-side // multiple) * multiple for side in (tiling.tile if tiling else prep.size))


def parity_inputs(source: Path, prep: Preprocessing, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """(normalised images (2, C, H, W), what they are): the run's own images when at hand, else seeded noise."""
    images = _run_images(source, prep, size)
    if images is not None:
        return images
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(PARITY_IMAGES, prep.in_channels, *size, generator=generator)
    return noise, "random: seeded standard-normal inputs (the run's data folder is not at hand)"


def _run_images(source: Path, prep: Preprocessing, size: tuple[int, int]) -> tuple[torch.Tensor, str] | None:
    from medseg.data.dataset import load_image_tensor
    from medseg.data.formats import discover
    from medseg.data.splits import cases_for

    run = next((Run(p) for p in (source, source.parent) if (p / "config.yaml").is_file()), None)  # RUN or RUN/model
    if run is None or not run.splits_file.is_file():
        return None
    try:
        data = run.data_root()
        splits = run.splits()
        stems = next((splits[name] for name in ("val", "test", "train") if splits[name]), [])[:PARITY_IMAGES]
        if not data.is_dir() or not stems:
            return None
        cases = cases_for(discover(data), stems)
        images = torch.stack([prep.normalise(prep.resize(load_image_tensor(case, prep), size)) for case in cases])
    except MedsegError:  # a moved or damaged data folder: parity still runs, on random inputs
        return None
    return images, f"real: {', '.join(stems)} from {data}"


def export(path: str | Path, fmt: str, out: str | Path, dynamic: bool = False, opset: int | None = None,
           level: int | None = None, exporter: str = "auto", rtol: float = RTOL,
           atol: float = ATOL) -> dict[str, Any]:
    """Export the saved network of `path` (a run or model folder) to OUT/model.onnx or OUT/model.pt with
    OUT/medseg-export.json; returns the sidecar. Nothing is written when the parity check fails."""
    if fmt not in FORMATS:
        raise MedsegError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if exporter not in EXPORTERS:
        raise MedsegError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    for flag, given in (("--opset", opset is not None), ("--exporter", exporter != "auto")):
        if given and fmt != "onnx":
            raise MedsegError(f"{flag} applies to --format onnx only; drop it")
    out = check_output_folder(out, "--out")
    if out.exists() and any(out.iterdir()) and not (out / SIDECAR).is_file():
        raise MedsegError(f"--out {out} is a folder that is not an earlier export (no {SIDECAR}); give a new or "
                          "empty folder")
    if fmt == "onnx":
        import_onnxruntime()
        _import_onnx()
    source = Path(path)
    folder = model_folder(source)
    config = read_model_config(folder, for_inference=True)
    network = prune_to(load_model(folder), level).float().eval()
    prep = Preprocessing.from_dict(config["preprocessing"])
    multiple = network.card.size_multiple
    size = export_size(prep, multiple, stored_tiling(config))
    images, described = parity_inputs(source, prep, size)
    wrapped = _Probabilities(network).eval()
    sizes, checks = [size], [images]
    if dynamic:  # the same images one size multiple larger: a graph with a baked-in size fails here
        sizes.append((size[0] + multiple, size[1] + multiple))
        checks.append(torch.nn.functional.interpolate(images, size=sizes[1], mode="bilinear", align_corners=False))
    with torch.no_grad():
        expected = [wrapped(x) for x in checks]
    file_name = FILES[fmt]
    started = time.perf_counter()
    with atomic_folder(out, replace=True) as tmp:
        if fmt == "onnx":
            written_by = _export_onnx(wrapped, images, tmp / file_name, dynamic, opset, exporter)
        else:
            written_by = _export_torchscript(wrapped, images, tmp / file_name)
        seconds = time.perf_counter() - started
        run_exported = (_onnx_runner if fmt == "onnx" else _torchscript_runner)(tmp / file_name)
        parity = compare([run_exported(x) for x in checks], expected, rtol, atol)
        parity.update(inputs=described, sizes=[list(s) for s in sizes], batch=int(images.shape[0]))
        if not parity["passed"]:
            raise MedsegError(f"parity check failed: the exported {fmt} file differs from PyTorch by up to "
                              f"{parity['max_abs_error']:.3g} in probability (allowed {atol:g} + {rtol:g} x |p|, "
                              f"{parity['mismatched']} of {parity['compared']} values outside); nothing was written "
                              f"to {out} — report it with the network name, or try --format "
                              f"{'torchscript' if fmt == 'onnx' else 'onnx'}")
        sidecar = _sidecar(source, folder, config, network, prep, fmt, file_name, dynamic, size, written_by,
                           _opset_of(tmp / file_name) if fmt == "onnx" else None, parity, seconds, level)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return sidecar


def compare(actual: list[np.ndarray], expected: list[torch.Tensor], rtol: float, atol: float) -> dict[str, Any]:
    """|a - b| <= atol + rtol * |b| over every value: the result with the worst error and its ratio to the
    tolerance (<= 1 passes)."""
    worst, ratio, mismatched, compared = 0.0, 0.0, 0, 0
    for got, want in zip(actual, expected):
        want = want.numpy()
        if got.shape != want.shape:
            raise MedsegError(f"parity check failed: the exported file returns shape {got.shape}, PyTorch "
                              f"{want.shape}; nothing was written")
        error = np.abs(got.astype(np.float64) - want)
        allowed = atol + rtol * np.abs(want)
        bad = ~(error <= allowed)  # NaN counts as a mismatch
        worst = max(worst, float(np.nan_to_num(error, nan=np.inf).max()))
        ratio = max(ratio, float(np.nan_to_num(error / allowed, nan=np.inf).max()))
        mismatched += int(bad.sum())
        compared += int(error.size)
    return {"passed": mismatched == 0, "compared_on": "probabilities", "rtol": rtol, "atol": atol,
            "max_abs_error": worst, "max_error_over_tolerance": ratio, "mismatched": mismatched,
            "compared": compared}


def _quiet():
    """Exporters print progress and warnings of their own; the CLI shows one line per command."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    stack.callback(logging.disable, previous)
    return stack


def _export_onnx(model: nn.Module, images: torch.Tensor, file: Path, dynamic: bool, opset: int | None,
                 exporter: str) -> str:
    """Write `file` with the dynamo exporter, else (or with exporter="torchscript") the TorchScript-based one;
    returns which wrote it."""
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    failure = None
    if exporter in ("auto", "dynamo"):
        batch = torch.export.Dim("batch", min=1)
        axes = {0: batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC} if dynamic else {0: batch}
        try:
            with _quiet():  # one self-contained file: the weights inside it, not in model.onnx.data
                torch.onnx.export(model, (images,), str(file), dynamo=True, dynamic_shapes=(axes,),
                                  external_data=False, **common)
            return "torch.onnx.export(dynamo=True)"
        except Exception as exc:  # noqa: BLE001 - any failure of the new exporter falls back to the old one
            failure = " ".join(str(exc).split())[:200]
            file.unlink(missing_ok=True)
            if exporter == "dynamo":
                raise MedsegError(f"the dynamo ONNX exporter failed ({failure}); try --exporter torchscript") \
                    from None
    names = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
    try:
        with _quiet():
            torch.onnx.export(model, (images,), str(file), dynamo=False, dynamic_axes={INPUT_NAME: names,
                              OUTPUT_NAME: names}, **common)
    except Exception as exc:  # noqa: BLE001 - one line with the reason (and the dynamo exporter's, if it ran)
        tried = f"dynamo: {failure}; " if failure else ""
        raise MedsegError(f"ONNX export failed ({tried}TorchScript-based: {' '.join(str(exc).split())[:200]}); "
                          "try --format torchscript") from None
    return "torch.onnx.export(dynamo=False)" + (f" (dynamo failed: {failure})" if failure else "")


def _export_torchscript(model: nn.Module, images: torch.Tensor, file: Path) -> str:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(model, (images,), check_trace=False)
        torch.jit.save(traced, str(file))
    return "torch.jit.trace"


def _onnx_runner(file: Path):
    ort = import_onnxruntime()
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]


def _torchscript_runner(file: Path):
    with _quiet():  # torch 2.14 deprecates TorchScript in a FutureWarning; the format still loads and runs
        loaded = torch.jit.load(str(file), map_location="cpu").eval()

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(x).numpy()

    return run


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise MedsegError("ONNX export needs the onnx package: pip install 'medseg[export]'") from None
    return onnx


def _opset_of(file: Path) -> int:
    model = _import_onnx().load(str(file), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _versions(fmt: str) -> dict[str, str]:
    found = {}
    for package in ("medseg", "torch", *(("onnx", "onnxruntime", "onnxscript") if fmt == "onnx" else ())):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def _sidecar(source: Path, folder: Path, config: dict[str, Any], network: SegmentationNetwork, prep: Preprocessing,
             fmt: str, file_name: str, dynamic: bool, size: tuple[int, int], exporter: str, opset: int | None,
             parity: dict[str, Any], seconds: float, level: int | None) -> dict[str, Any]:
    spec = network.spec
    shape = ["batch", spec.in_channels, "height" if dynamic else size[0], "width" if dynamic else size[1]]
    out_shape = [*shape[:1], spec.num_classes, *shape[2:]]
    return {
        "format": SIDECAR_FORMAT,
        "kind": fmt,
        "file": file_name,
        "network": spec.name,
        "options": {k: v for k, v in spec.options.items() if k != "encoder_weights"},
        "level": level,
        "in_channels": spec.in_channels,
        "num_classes": spec.num_classes,
        "activation": "sigmoid" if spec.num_classes == 1 else "softmax over channels",
        "activation_in_graph": True,
        "mask_threshold": config.get("mask_threshold"),
        # predict's defaults travel with the file: tiles (None: whole images) and the tuned decision threshold
        "tiling": config.get("tiling"),
        "threshold": read_threshold(folder),
        "slicing": config.get("slicing"),  # how volumes are cut for a network trained on `medseg slices` output
        "preprocessing": {**prep.to_dict(), "normalize_values": normalisation_values(prep),
                          "size_multiple": network.card.size_multiple, "export_size": list(size),
                          "steps": "image as float in [0, 1] with in_channels channels; resize to `size` (bilinear, "
                                   "antialiased) or, for a dynamic export, keep it; normalise (x - mean) / std per "
                                   "channel; pad bottom/right (reflect) to a multiple of size_multiple; crop the "
                                   "output back"},
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "shape": shape},
        "output": {"name": OUTPUT_NAME, "layout": "NCHW", "dtype": "float32", "shape": out_shape,
                   "meaning": "probabilities (the activation is applied in the graph)"},
        "dynamic": dynamic,
        "exporter": exporter,
        "opset": opset,
        "export_seconds": round(seconds, 2),
        "source": {"path": str(source.resolve()), "model_folder": str(folder.resolve())},
        "versions": _versions(fmt),
        "parity": parity,
        "exported": now(),
    }
