"""Inference shared by evaluate, predict and benchmark: device choice, padding to the network's size
multiple, activation, and resizing probabilities back to an image's original size."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.transforms import Preprocessing
from medseg.engine.module import activate
from medseg.engine.precision import PRECISIONS, choose_numeric_mode
from medseg.errors import MedsegError
from medseg.models import load_model
from medseg.models.base import Gated, Prunable, SegmentationNetwork
from medseg.models.saving import model_folder, read_model_config, read_threshold


def pick_device(name: str = "auto") -> torch.device:
    """--device as a torch device: auto, cpu, cuda, cuda:N or mps, refused in one line when this machine lacks
    it (torch would fail later with a traceback, or at the first tensor moved there)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise MedsegError(f"--device {name!r} asked for, but CUDA is not available on this machine; use "
                              "--device cpu")
        index, count = int(match.group(1) or 0), torch.cuda.device_count()
        if index >= count:
            raise MedsegError(f"--device {name!r}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise MedsegError("--device 'mps' asked for, but Apple's MPS is not available on this machine; use "
                              "--device cpu")
        return torch.device(name)
    raise MedsegError(f"--device {name!r} is not a device medseg runs on; use auto, cpu, cuda, cuda:N or mps")


class Predictor:
    """A saved network ready for inference, with the preprocessing it was trained with."""

    def __init__(self, path: str | Path, device: str = "auto", level: int | None = None, precision: str = "auto"):
        if precision not in PRECISIONS:
            raise MedsegError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = pick_device(device)  # the cheap refusals before the weights are read
        self.folder = model_folder(path)
        self.config = read_model_config(self.folder, for_inference=True)
        self.model: SegmentationNetwork = prune_to(load_model(self.folder), level).to(self.device)
        # the choice training makes (medseg.engine.precision): bf16 + channels_last on a CPU with BF16 instructions
        self.mode = choose_numeric_mode(precision, self.model.card, self.device.type)
        if self.mode.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.preprocessing = Preprocessing.from_dict(self.config["preprocessing"])
        self.size_multiple = self.model.card.size_multiple
        self.num_classes = int(self.config["num_classes"])
        self.mask_threshold = self.config.get("mask_threshold")
        self.threshold = read_threshold(self.folder)  # tuned by `medseg tune-threshold`; None: 0.5
        self.last_attention: dict[str, torch.Tensor] = {}

    def record_attention(self) -> None:
        """Keep the first-layer attention coefficients of every forward (networks with attention gates)."""
        if not isinstance(self.model, Gated) or not self.model.first_layer_gates():
            raise MedsegError(f"network {self.config['name']!r} has no attention gates to save; drop --save-attention")
        self.model.record_attention(True)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> probabilities (B, K, H, W), padded to the size multiple and
        cropped back."""
        images = images.to(self.device, non_blocking=True)
        padded, (height, width) = pad_to_multiple(images, self.size_multiple)
        if self.mode.channels_last:
            padded = padded.contiguous(memory_format=torch.channels_last)
        dtype = self.mode.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.model(padded)
        if isinstance(self.model, Gated):
            self.last_attention = {name: a[..., :height, :width].float().cpu()
                                   for name, a in self.model.attention_maps().items()}
        return activate(logits.float())[..., :height, :width]


def prune_to(model: SegmentationNetwork, level: int | None) -> SegmentationNetwork:
    """Prune a deeply supervised network to `level` (ANU-Net L_N); None leaves it as it is."""
    if level is None:
        return model
    if not isinstance(model, Prunable):
        raise MedsegError(f"network {model.spec.name!r} has no pruning levels; drop --level")
    if level < 1:
        raise MedsegError(f"--level {level}: pruning levels start at 1 (ANU-Net L1, the smallest network)")
    return model.prune(level).eval()


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad bottom/right (reflect, or replicate when the image is too small to reflect) to a multiple."""
    height, width = images.shape[-2:]
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if not pad_h and not pad_w:
        return images, (height, width)
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(images, (0, pad_w, 0, pad_h), mode=mode), (height, width)


def resize_probabilities(probabilities: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) -> (K, H, W), bilinear; probabilities are resized before any thresholding."""
    if tuple(probabilities.shape[-2:]) == tuple(size):
        return probabilities
    return F.interpolate(probabilities.unsqueeze(0), size=tuple(size), mode="bilinear", align_corners=False)[0]


def label_image(labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Label map -> array to save: 0/255 for binary (one sigmoid channel or a two-class head), the label
    values for three classes or more."""
    array = labels.cpu().numpy()
    if num_classes <= 2:
        return (array > 0).astype(np.uint8) * 255
    return array.astype(np.uint8 if num_classes <= 256 else np.uint16)


def heat_map(values: torch.Tensor) -> np.ndarray:
    """(H, W) values in [0, 1] -> RGB uint8 through matplotlib's perceptually uniform "viridis" colour map."""
    from matplotlib import colormaps

    rgba = colormaps["viridis"](values.clamp(0, 1).numpy())
    return (rgba[..., :3] * 255 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, truth: np.ndarray | None = None, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 picture: the prediction tinted over the image; with `truth`, its outline in green.

    `image` is (H, W, C) in [0, 1]; labels/truth are (H, W) integer maps (0 = background).
    """
    rgb = image[..., :3] if image.shape[-1] >= 3 else np.repeat(image[..., :1], 3, axis=-1)
    rgb = np.clip(rgb, 0, 1).astype(np.float32)
    palette = np.array([[0, 0, 0], [255, 40, 40], [40, 120, 255], [255, 200, 0], [200, 0, 255], [0, 220, 220]],
                       np.float32) / 255
    colour = palette[np.clip(labels, 0, len(palette) - 1)]
    tinted = np.where((labels > 0)[..., None], (1 - alpha) * rgb + alpha * colour, rgb)
    if truth is not None:
        edge = _outline(truth > 0)
        tinted[edge] = (0.1, 0.95, 0.2)
    return (tinted * 255 + 0.5).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner

