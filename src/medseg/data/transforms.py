"""Preprocessing (resize, channels, normalisation) and augmentation with torchvision.transforms.v2.

Image and mask travel together as `tv_tensors.Image` / `tv_tensors.Mask`, so every geometric transform
moves both the same way and masks are always resampled with nearest neighbour (labels stay labels).
Augmentation runs at the training size on intensities in [0, 1]; normalisation comes last.

`Preprocessing` is the part shared by training, evaluation and prediction; it is stored in the saved
model's config.json so inference uses exactly what training used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from medseg.errors import MedsegError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# One-channel input with "imagenet" normalisation: the mean of the three channel statistics.
IMAGENET_GRAY = (sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3)


NORMALIZATIONS = ("imagenet", "per_image", "dataset", "none")  # named normalisations; or {mean, std}


def statistics_problem(mean: list[float], std: list[float]) -> str | None:
    """Why {mean, std} cannot normalise images (None when they can): a mean that is not finite, or a std that
    is not a finite positive number, turns every pixel into NaN or Inf and trains (or predicts) nothing.
    The one rule for a recipe's `data.normalize` and a model folder's stored preprocessing."""
    if not mean or not all(math.isfinite(v) for v in mean):
        return f"mean {mean} must be a non-empty list of finite numbers"
    if not std or not all(math.isfinite(v) and v > 0 for v in std):
        return f"std {std} must be positive (one finite value per channel): zero, negative or NaN makes every " \
               "pixel NaN or Inf"
    return None


@dataclass(frozen=True)
class Preprocessing:
    """What turns a [0, 1] image (C, H, W) into network input: size (H, W), channels, normalisation."""

    size: tuple[int, int]
    in_channels: int
    normalize: Any = "imagenet"  # "imagenet" | "per_image" | "none" | {"mean": [...], "std": [...]}
    # ("dataset" is resolved to {"mean", "std"} of the training split by `medseg train`)
    crop: tuple[int, int] | None = None  # trained on random crops (H, W) at native resolution (`data.crop`)

    def to_dict(self) -> dict[str, Any]:
        raw = {**asdict(self), "size": list(self.size)}
        if self.crop is None:  # model folders of networks trained on whole images stay as they were
            del raw["crop"]
        else:
            raw["crop"] = list(self.crop)
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Preprocessing":
        crop = raw.get("crop")
        return cls(size=tuple(raw["size"]), in_channels=int(raw["in_channels"]),
                   normalize=raw.get("normalize", "imagenet"), crop=tuple(crop) if crop else None)

    def resize(self, image: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Bilinear (antialiased) resize of an image batch or single image to `size` (default: self.size)."""
        return v2.functional.resize(image, list(size or self.size), InterpolationMode.BILINEAR, antialias=True)

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """Normalise (..., C, H, W) intensities in [0, 1]."""
        norm = self.normalize
        if norm == "none":
            return image
        if norm == "per_image":
            dims = (-3, -2, -1)
            mean = image.mean(dim=dims, keepdim=True)
            std = image.std(dim=dims, keepdim=True).clamp(min=1e-6)
            return (image - mean) / std
        if norm == "dataset":
            raise MedsegError("data.normalize is 'dataset' but no statistics were computed; they are computed by "
                              "`medseg train` and stored in the run, use the run's model")
        if norm == "imagenet":
            mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if image.shape[-3] == 3
                         else ([IMAGENET_GRAY[0]], [IMAGENET_GRAY[1]]))
        else:
            mean, std = norm["mean"], norm["std"]
        if len(mean) not in (1, image.shape[-3]):
            raise MedsegError(f"normalisation has {len(mean)} channel means but the input has "
                              f"{image.shape[-3]} channels")
        mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
        return (image - mean_t) / std_t


def _rotate(degrees: float = 10.0, p: float = 1.0):
    return v2.RandomApply([v2.RandomRotation(degrees, interpolation=InterpolationMode.BILINEAR, fill=0)], p=p)


def _affine(degrees: float = 0.0, translate: tuple[float, float] | None = None,
            scale: tuple[float, float] | None = None, shear: float | None = None, p: float = 1.0):
    affine = v2.RandomAffine(degrees, translate=translate, scale=scale, shear=shear,
                             interpolation=InterpolationMode.BILINEAR, fill=0)
    return v2.RandomApply([affine], p=p)


def _zoom(scale: tuple[float, float] = (0.9, 1.1), p: float = 1.0):
    return _affine(scale=scale, p=p)


def _color_jitter(brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.0, hue: float = 0.0,
                  p: float = 1.0):
    return v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=p)


class RandomRot90(v2.Transform):
    """Rotate by a random multiple of 90 degrees (square inputs), image and mask alike."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"angle": 90.0 * int(torch.randint(4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.rotate, inpt, angle=params["angle"])


class RandomChannelShift(v2.Transform):
    """Keras' `channel_shift_range` (FocusNet's "small random channel shifts", paper Sec. 3.2): add a
    uniform offset in [-shift, shift] to the image (Keras: one offset for all channels; `per_channel`: one
    each) and clip to the image's own min..max, as Keras does. Masks pass through unchanged."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, shift: float = 0.05, per_channel: bool = False, p: float = 1.0):
        super().__init__()
        self.shift, self.per_channel, self.p = float(shift), bool(per_channel), float(p)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        channels = next(x.shape[-3] for x in flat_inputs if isinstance(x, tv_tensors.Image))
        offsets = (torch.rand(channels if self.per_channel else 1) * 2 - 1) * self.shift
        return {"offsets": offsets, "apply": bool(torch.rand(()) < self.p)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        shifted = inpt + params["offsets"].to(inpt.dtype).view(-1, 1, 1)
        return tv_tensors.wrap(shifted.clamp(float(inpt.min()), float(inpt.max())), like=inpt)


AUGMENTATIONS = {
    "hflip": lambda p=0.5: v2.RandomHorizontalFlip(p),
    "vflip": lambda p=0.5: v2.RandomVerticalFlip(p),
    "rot90": lambda: RandomRot90(),
    "rotate": _rotate,
    "affine": _affine,
    "zoom": _zoom,
    "color_jitter": _color_jitter,
    "grayscale": lambda p=0.1: v2.RandomGrayscale(p),  # RGB to its luma in every channel; a 1-channel image stays
    "channel_shift": RandomChannelShift,
}


def build_augmentation(spec: list[str | dict[str, Any]], size: tuple[int, int]) -> v2.Compose | None:
    """Recipe `data.augment` -> one v2.Compose, e.g. [hflip, {name: rotate, degrees: 10, p: 0.5}]."""
    steps = []
    for item in spec:
        options = {"name": item} if isinstance(item, str) else dict(item)
        name = options.pop("name", None)
        if name not in AUGMENTATIONS:
            raise MedsegError(f"unknown augmentation {name!r} in data.augment; "
                              f"available: {', '.join(sorted(AUGMENTATIONS))}")
        if name == "rot90" and size[0] != size[1]:
            raise MedsegError(f"augmentation rot90 needs a square data.size, got {size[0]}x{size[1]}")
        try:
            steps.append(AUGMENTATIONS[name](**options))
        except TypeError as exc:
            raise MedsegError(f"augmentation {name!r}: {exc}") from None
    return v2.Compose(steps) if steps else None


def augment_pair(augmentation: v2.Compose | None, image: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one random draw to image (C, H, W) and mask (H, W) together."""
    if augmentation is None:
        return image, mask
    out_image, out_mask = augmentation(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)


def pad_to_at_least(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad (..., H, W) bottom/right to at least `size`: reflected, or replicated where the image is too small to
    reflect (why: mirrored tissue keeps the image statistics a network saw, where zeros would be a dark frame).
    Integer label maps are padded the same way, so labels follow the mirrored pixels."""
    height, width = image.shape[-2:]
    pad_h, pad_w = max(0, size[0] - height), max(0, size[1] - width)
    if not pad_h and not pad_w:
        return image
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    batch = image.reshape(-1, 1, height, width) if image.ndim < 4 else image
    padded = torch.nn.functional.pad(batch.float(), (0, pad_w, 0, pad_h), mode=mode).to(image.dtype)
    return padded.reshape(*image.shape[:-2], height + pad_h, width + pad_w)


def pad_to_multiple(images: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (..., H, W) bottom/right to the next multiple of `multiple` as `pad_to_at_least` pads; returns the
    padded images and the original (H, W) to crop back to."""
    height, width = images.shape[-2:]
    target = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    return pad_to_at_least(images, target), (height, width)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a label mask (..., H, W)."""
    return v2.functional.resize(tv_tensors.Mask(mask), list(size),
                                InterpolationMode.NEAREST_EXACT).as_subclass(torch.Tensor)
