"""Inference shared by evaluate, predict and benchmark: device choice, padding to the network's size
multiple, activation, and resizing probabilities back to an image's original size; and `InferencePlan`, how
predict and evaluate turn an image into probabilities: whole images resized to the training size (batched),
whole images at their own size (`predict --native`), or sliding windows at native resolution (MONAI's
`sliding_window_inference`), each with optional flip TTA and a fold ensemble.

Choices (ours, where the papers and MONAI are silent):
- Tiles are blended with MONAI's Gaussian importance map (sigma 1/8 of the tile, as nnU-Net) over the
  *probabilities* each window gives, so tiles, flips and ensemble members are all averaged in one space.
  Windows run on the network's device; the blended map lives on the CPU (`device="cpu"`), so memory grows with
  the image (a few float32 copies of it), never with the number of tiles: a 6000x6000 image fits in RAM.
- An image smaller than a tile is padded bottom/right by reflection, as crops are in training, and cropped back.
- Defaults: tiles of the training crop when the network trained on crops (`data.crop`, overlap 0.5), or the
  recipe's `eval.tiling` (stored in the model folder), else whole images resized to the training size.
- `--tta flips` averages the four flip combinations (none, horizontal, vertical, both), each flipped back.
- An ensemble's members must agree on classes, channels, training size and crop; their normalisations may differ
  (each fold of `data.normalize: dataset` has its own statistics), so every member normalises the image itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medseg.data.dataset import InferenceDataset
from medseg.data.transforms import Preprocessing, pad_to_at_least, pad_to_multiple
from medseg.engine.module import activate
from medseg.engine.onnx_predictor import OnnxPredictor, is_export_folder
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


TTA_MODES = ("none", "flips")
# The flip combinations of `--tta flips` as the dims torch.flip takes: none, horizontal, vertical, both.
FLIPS = ((), (-1,), (-2,), (-2, -1))


@dataclass(frozen=True)
class Tiling:
    """Sliding windows of `tile` (H, W) pixels overlapping by `overlap` (a fraction of the tile)."""

    tile: tuple[int, int]
    overlap: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {"tile": list(self.tile), "overlap": self.overlap}


def parse_tile(text: str) -> tuple[int, int] | None:
    """--tile: "256" or "256x320" (H x W), or "off" for whole images; refused in one line otherwise."""
    if text.strip().lower() == "off":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", text)
    if not match or int(match.group(1)) < 1 or (match.group(2) is not None and int(match.group(2)) < 1):
        raise MedsegError(f"--tile {text!r}: give a tile size like 256 or 256x320 (height x width), or off")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def stored_tiling(config: dict[str, Any]) -> Tiling | None:
    """A model folder's default tiling: its recipe's eval.tiling, else tiles of its training crop, else None."""
    raw = config.get("tiling")
    if isinstance(raw, dict) and raw.get("tile"):
        tile = raw["tile"]
        return Tiling((tile, tile) if isinstance(tile, int) else tuple(tile), float(raw.get("overlap", 0.5)))
    crop = config.get("preprocessing", {}).get("crop")
    return Tiling(tuple(crop)) if crop else None


class InferencePlan:
    """How images become probabilities: one network or the average of an ensemble's members (`predictors`, the
    first is the reference whose preprocessing, classes and device the plan reports), with `tiling` (None:
    whole images), `tta` ("none" or "flips") and `native` (whole images at their own size instead of resized)."""

    def __init__(self, predictors: list[Predictor], tiling: Tiling | None = None, tta: str = "none",
                 native: bool = False, batch_size: int = 8):
        if tta not in TTA_MODES:
            raise MedsegError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if tiling is not None and native:
            raise MedsegError("--native runs whole images at their own size and --tile cuts them into tiles; "
                              "give one of them")
        check_members(predictors)
        self.predictors = predictors
        self.tta = tta
        self.native = native
        self.batch_size = batch_size
        self.size_multiple = math.lcm(*(p.size_multiple for p in predictors))
        if tiling is not None:
            check_tiling(tiling, self.size_multiple, predictors[0].config.get("name", "the network"))
        self.tiling = tiling

    @property
    def reference(self) -> Predictor:
        return self.predictors[0]

    @property
    def preprocessing(self) -> Preprocessing:
        return self.reference.preprocessing

    @property
    def num_classes(self) -> int:
        return self.reference.num_classes

    @property
    def resizes(self) -> bool:
        """Whole images resized to the training size: the batched path."""
        return self.tiling is None and not self.native

    @property
    def flips(self) -> tuple[tuple[int, ...], ...]:
        return FLIPS if self.tta == "flips" else FLIPS[:1]

    def record_attention(self) -> None:
        """Attention maps come from one whole-image forward of one network: refused for tiles, flips, ensembles."""
        if self.tiling is not None or self.tta != "none" or len(self.predictors) > 1:
            raise MedsegError("--save-attention needs one network run once on the whole image; drop --tile (or give "
                              "--tile off), --tta and --ensemble")
        self.reference.record_attention()

    @property
    def last_attention(self) -> dict[str, torch.Tensor]:
        return getattr(self.reference, "last_attention", {})

    def to_dict(self) -> dict[str, Any]:
        """What predict.json and summary.json record: the members (model folders), tiling, TTA, native."""
        return {"members": [str(Path(getattr(p, "folder", "?")).resolve()) for p in self.predictors],
                "tiling": self.tiling.to_dict() if self.tiling else None, "tta": self.tta, "native": self.native,
                "mode": "tiled" if self.tiling else "native" if self.native else "resized"}

    @torch.no_grad()
    def batch_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, h, w) in [0, 1] -> probabilities (B, K, h, w): every member normalises, every flip runs
        (and is flipped back), and all are averaged."""
        total = None
        for member in self.predictors:
            normalised = member.preprocessing.normalise(images)
            for dims in self.flips:
                probs = member.probabilities(normalised.flip(dims) if dims else normalised)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total + probs
        return total / (len(self.predictors) * len(self.flips))

    @torch.no_grad()
    def probabilities_at_original_size(self, image: torch.Tensor) -> torch.Tensor:
        """One image (C, H, W) in [0, 1] at its own size -> probabilities (K, H, W) on the CPU."""
        if self.tiling is not None:
            return self._tiled(image)
        if self.native:
            return self.batch_probabilities(image[None]).cpu()[0]
        small = self.preprocessing.resize(image)
        return resize_probabilities(self.batch_probabilities(small[None]).cpu()[0], tuple(image.shape[-2:]))

    def batch_at_original_size(self, images: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """A loader's batch (`inference_dataset`: resized images when `resizes`, else images at their own size, all
        of one size) -> probabilities (K, H, W) per image at its original size, on the CPU."""
        if self.resizes:
            probs = self.batch_probabilities(images).cpu()
            return [resize_probabilities(p, size) for p, size in zip(probs, sizes)]
        if self.native:  # predict batches images of one size (`predict.same_size_batches`)
            return list(self.batch_probabilities(images).cpu())
        return [self.probabilities_at_original_size(image) for image in images]

    def _tiled(self, image: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        height, width = image.shape[-2:]
        tile = self.tiling.tile
        total = None
        for member in self.predictors:
            padded = pad_to_at_least(member.preprocessing.normalise(image), tile)[None]
            for dims in self.flips:
                probs = sliding_window_inference(padded.flip(dims) if dims else padded, roi_size=tile,
                                                 sw_batch_size=self.batch_size, predictor=member.probabilities,
                                                 overlap=self.tiling.overlap, mode="gaussian",
                                                 sw_device=member.device, device="cpu")
                probs = probs.as_subclass(torch.Tensor)  # MONAI may hand back its MetaTensor
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total.add_(probs)
        return (total / (len(self.predictors) * len(self.flips)))[0, :, :height, :width]


def check_members(predictors: list[Predictor]) -> None:
    """An ensemble's members agree on what the plan reports for all of them (the module docstring says why
    normalisation may differ); the same model folder twice is refused."""
    if not predictors:
        raise MedsegError("no network to predict with; give a run folder or a model folder")
    first = predictors[0]

    def key(member: Predictor) -> dict[str, Any]:
        prep = member.preprocessing
        return {"classes": member.num_classes, "input channels": prep.in_channels,
                "training size": "x".join(map(str, prep.size)),
                "training crop": "x".join(map(str, prep.crop)) if prep.crop else "none"}

    seen = {}
    for member in predictors:
        folder = Path(getattr(member, "folder", "?")).resolve()
        if folder in seen:
            raise MedsegError(f"the model {folder} is given twice; an ensemble's members are different runs")
        seen[folder] = member
        for name, value in key(member).items():
            expected = key(first)[name]
            if value != expected:
                raise MedsegError(f"ensemble members disagree on {name}: {expected} in {getattr(first, 'folder', '?')}"
                                  f", {value} in {folder}; ensemble only runs of one recipe (e.g. a study's folds)")


def check_tiling(tiling: Tiling, multiple: int, name: str) -> None:
    """Tiles are multiples of the network's size multiple, and the overlap a fraction in [0, 1)."""
    height, width = tiling.tile
    if height % multiple or width % multiple:
        fit = "x".join(str(max(multiple, round(side / multiple) * multiple)) for side in (height, width))
        raise MedsegError(f"--tile {height}x{width} is not a multiple of {multiple}, the size multiple of {name}; "
                          f"use e.g. --tile {fit}")
    if not (isinstance(tiling.overlap, (int, float)) and 0 <= tiling.overlap < 1):
        raise MedsegError(f"--overlap must be a fraction of the tile in [0, 1), e.g. 0.5; got {tiling.overlap}")


def choose_tiling(reference: Predictor, tile: str | None, overlap: float | None, native: bool = False
                  ) -> Tiling | None:
    """The tiling asked for: `tile` ("off", "256", "256x320") when given, else none with `native`, else the
    model folder's default (`stored_tiling`); `overlap` overrides the default overlap."""
    if tile is not None:
        size = parse_tile(tile)
        tiling = None if size is None else Tiling(size)
    else:
        tiling = None if native else stored_tiling(reference.config)
    if overlap is not None:
        if tiling is None:
            raise MedsegError("--overlap applies to tiled inference; give --tile too (this network's default is "
                              "whole images)" if tile is None else "--overlap applies to tiles; --tile off has none")
        tiling = Tiling(tiling.tile, overlap)
    return tiling


def build_plan(models: list[str | Path], device: str = "auto", level: int | None = None, precision: str = "auto",
               tile: str | None = None, overlap: float | None = None, tta: str = "none", native: bool = False,
               batch_size: int = 8) -> InferencePlan:
    """Open every model (run or model folder) and plan inference as predict and evaluate's options say."""
    if tta not in TTA_MODES:  # before the weights are read
        raise MedsegError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    if tile is not None:
        parse_tile(tile)
    predictors = [OnnxPredictor(path, device, level, precision, native) if is_export_folder(path)
                  else Predictor(path, device, level, precision) for path in models]
    return InferencePlan(predictors, choose_tiling(predictors[0], tile, overlap, native), tta, native, batch_size)


def inference_dataset(plan: InferencePlan, cases: list, with_masks: bool = True):
    """The dataset a plan's loader reads: images in [0, 1], resized to the training size when the plan `resizes`,
    else at their own size (one image a batch); masks at their original size."""
    return InferenceDataset(cases, plan.preprocessing, plan.num_classes, plan.reference.mask_threshold,
                            with_masks=with_masks, normalise=False, resize=plan.resizes)


def prune_to(model: SegmentationNetwork, level: int | None) -> SegmentationNetwork:
    """Prune a deeply supervised network to `level` (ANU-Net L_N); None leaves it as it is."""
    if level is None:
        return model
    if not isinstance(model, Prunable):
        raise MedsegError(f"network {model.spec.name!r} has no pruning levels; drop --level")
    if level < 1:
        raise MedsegError(f"--level {level}: pruning levels start at 1 (ANU-Net L1, the smallest network)")
    return model.prune(level).eval()


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

