"""Predicting from a folder written by `medseg export --format onnx`: `OnnxPredictor` has the inference interface of
`medseg.engine.inference.Predictor` (device, folder, config, preprocessing, size_multiple, num_classes,
mask_threshold, mode, probabilities(images)), so predict runs its one pipeline on either.

The network is never rebuilt: onnxruntime runs model.onnx and medseg-export.json says how to feed it. The graph
returns probabilities (the activation is inside it, `medseg.engine.export`). onnxruntime's CPU provider is the
default (`auto` and `cpu`); `cuda` asks for its CUDA provider and is refused when this onnxruntime has none. A
fixed export takes only the training size padded to the size multiple, so `--native` (and any other size) is
refused in one line; a `--dynamic` export takes any size that predict pads to the multiple.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.transforms import Preprocessing, pad_to_multiple
from medseg.engine.precision import NumericMode
from medseg.errors import MedsegError

SIDECAR = "medseg-export.json"
SIDECAR_FORMAT = 1
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
EXPORT_AGAIN = "export the run again with `medseg export RUN --format onnx --out DIR`"


def import_onnxruntime():
    """onnxruntime, or one line saying how to install it (an optional extra)."""
    try:
        import onnxruntime
    except ImportError:
        raise MedsegError("ONNX models need onnxruntime: pip install 'medseg[export]'") from None
    return onnxruntime


def is_export_folder(path: str | Path) -> bool:
    """Whether `path` is a folder written by `medseg export` (it holds medseg-export.json)."""
    return (Path(path) / SIDECAR).is_file()


def read_sidecar(folder: Path) -> dict[str, Any]:
    """medseg-export.json of an export folder, checked for what predict reads; a damaged one is named in one line."""
    file = folder / SIDECAR
    try:
        sidecar = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MedsegError(f"{file} is not valid JSON ({' '.join(str(exc).split())}); {EXPORT_AGAIN}") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise MedsegError(f"{file} is not a medseg export description of format {SIDECAR_FORMAT}; {EXPORT_AGAIN}")
    prep = sidecar.get("preprocessing")
    missing = [key for key in ("kind", "file", "network", "in_channels", "num_classes", "dynamic")
               if key not in sidecar]
    missing += [f"preprocessing.{key}" for key in ("size", "in_channels", "size_multiple", "export_size")
                if not isinstance(prep, dict) or key not in prep]
    if missing:
        raise MedsegError(f"{file} lacks {', '.join(missing)}; {EXPORT_AGAIN}")
    return sidecar


class OnnxPredictor:
    """An exported ONNX network ready for inference, with the preprocessing it was trained with."""

    def __init__(self, path: str | Path, device: str = "auto", level: int | None = None, precision: str = "auto",
                 native: bool = False):
        self.folder = Path(path)
        self.sidecar = read_sidecar(self.folder)
        if self.sidecar["kind"] != "onnx":
            raise MedsegError(f"{self.folder} holds a {self.sidecar['kind']} export; predict runs ONNX exports and "
                              "run folders: give the run folder, or export it with --format onnx")
        if level is not None:
            raise MedsegError(f"--level {level}: an exported network cannot be pruned; export the pruned network "
                              f"(`medseg export RUN --level {level} ...`) and drop --level")
        if precision not in ("auto", "32"):
            raise MedsegError(f"--precision {precision}: an ONNX export runs in fp32; drop --precision")
        if native and not self.sidecar["dynamic"]:
            size = "x".join(map(str, self.sidecar["preprocessing"]["export_size"]))
            raise MedsegError(f"--native: {self.folder} was exported at the fixed size {size}; drop --native, or "
                              "export the run again with --dynamic")
        ort = import_onnxruntime()
        file = self.folder / self.sidecar["file"]
        if not file.is_file():
            raise MedsegError(f"{file} is missing beside {SIDECAR}; {EXPORT_AGAIN}")
        self.device, providers = _providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(file), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a damaged or foreign file
            raise MedsegError(f"onnxruntime cannot load {file} ({' '.join(str(exc).split())[:200]}); "
                              f"{EXPORT_AGAIN}") from None
        prep = self.sidecar["preprocessing"]
        self.preprocessing = Preprocessing.from_dict(prep)
        self.size_multiple = int(prep["size_multiple"])
        self.num_classes = int(self.sidecar["num_classes"])
        self.mask_threshold = self.sidecar.get("mask_threshold")
        self.config = {"name": self.sidecar["network"], "in_channels": int(self.sidecar["in_channels"]),
                       "num_classes": self.num_classes, "kwargs": self.sidecar.get("options", {}),
                       "preprocessing": {k: prep[k] for k in ("size", "in_channels", "normalize", "crop")
                                         if k in prep},
                       "tiling": self.sidecar.get("tiling"), "mask_threshold": self.mask_threshold,
                       "slicing": self.sidecar.get("slicing")}
        self.threshold = self.sidecar.get("threshold")  # tuned with `medseg tune-threshold` before export
        self.mode = NumericMode("32-true", False, "ONNX export, fp32")
        self.last_attention: dict[str, torch.Tensor] = {}

    def record_attention(self) -> None:
        raise MedsegError("an exported network keeps no attention coefficients; predict from the run folder for "
                          "--save-attention")

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> probabilities (B, K, H, W) on the CPU, padded to the size multiple and
        cropped back."""
        padded, (height, width) = pad_to_multiple(images.detach().float().cpu(), self.size_multiple)
        fixed = self.sidecar["preprocessing"]["export_size"]
        if not self.sidecar["dynamic"] and list(padded.shape[-2:]) != list(fixed):
            raise MedsegError(f"{self.folder} was exported at the fixed size {fixed[0]}x{fixed[1]}, not "
                              f"{padded.shape[-2]}x{padded.shape[-1]}; export the run again with --dynamic")
        array = np.ascontiguousarray(padded.numpy())
        output = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0]
        return torch.from_numpy(output)[..., :height, :width]


def _providers(device: str, available: list[str]) -> tuple[torch.device, list[str]]:
    """--device as onnxruntime providers: CPU for auto and cpu, CUDA (then CPU for ops it lacks) for cuda[:N]."""
    if device in ("auto", "cpu"):
        return torch.device("cpu"), ["CPUExecutionProvider"]
    if device == "cuda" or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in available:
            raise MedsegError(f"--device {device}: this onnxruntime has no CUDA provider (it has "
                              f"{', '.join(available)}); use --device cpu, or install onnxruntime-gpu")
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise MedsegError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
        return torch.device("cuda", int(index)), [("CUDAExecutionProvider", {"device_id": int(index)}),
                                                  "CPUExecutionProvider"]
    raise MedsegError(f"--device {device!r}: an ONNX export runs on cpu or cuda[:N]")
