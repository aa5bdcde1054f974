"""Model folders: `config.json` + `model.safetensors` (smp-style save_pretrained / from_pretrained).

No pickle anywhere: the network is rebuilt from the registry with the stored name and options, then the
weights are loaded from safetensors. Non-persistent buffers (fixed filters) and anything outside the
module's state_dict are never written. `config.json` also carries the preprocessing the network was
trained with, so predict and evaluate need nothing but this folder. (Initialising a network from a local
file for training, `encoder_weights` or a recipe's `model.weights`, is `medseg.models.pretrained`.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from medseg.data.transforms import NORMALIZATIONS, statistics_problem
from medseg.errors import MedsegError
from medseg.files import atomic_folder
from medseg.models.base import SegmentationNetwork
from medseg.models.registry import ENCODER_WEIGHTS, create_model

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Written by `medseg tune-threshold` beside the weights; saving a model replaces the whole folder, so a threshold
# tuned for other weights never outlives them.
THRESHOLD_NAME = "threshold.json"
FORMAT_VERSION = 2
# Options whose default changed: a folder of format <= N that does not name the option was built with the old
# value. Format 2: Fovea-UNet's default encoder became the paper's four-bottleneck `ghostnet_4b`.
CHANGED_DEFAULTS = {1: {"fovea_unet": {"encoder": "ghostnet"}}}
INITIALISATION_OPTIONS = (ENCODER_WEIGHTS,)


def save_model(model: SegmentationNetwork, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `folder/config.json` and `folder/model.safetensors` atomically (a temporary folder, then a rename)."""
    config = model.spec.to_dict()
    folder = Path(folder)
    with atomic_folder(folder, replace=True) as tmp:
        _save_weights(model, str(tmp / WEIGHTS_NAME))
        # Local pretrained-weight paths only initialise a network: the trained weights are in the
        # safetensors file, so a rebuild must not need (or reload) those files.
        kwargs = {k: v for k, v in config["kwargs"].items() if k not in INITIALISATION_OPTIONS}
        payload = {"format": FORMAT_VERSION, **config, "kwargs": kwargs, **(extra or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return folder


# What to do about a damaged model folder: it is written whole by `medseg train`, so it was damaged afterwards.
RESTORE = "copy the model folder again from where it came, or train the run again"
NORMALISATIONS = tuple(n for n in NORMALIZATIONS if n != "dataset")  # stored ones: `dataset` became {mean, std}


def read_model_config(path: str | Path, for_inference: bool = False) -> dict[str, Any]:
    """The config.json of a model folder, or of `RUN/model/` when given a run folder; a damaged or wrongly shaped
    file is named in one line. `for_inference` also requires the preprocessing that predict and evaluate apply
    (a folder saved by `save_model` without it rebuilds the network, but cannot feed it images)."""
    file = model_folder(path) / CONFIG_NAME
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        raise MedsegError(f"{file} is not valid JSON ({problem}); {RESTORE}") from None
    problem = config_problem(config, for_inference)
    if problem:
        raise MedsegError(f"{file} is damaged: {problem}; {RESTORE}")
    return config


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def config_problem(config: Any, for_inference: bool = False) -> str | None:
    """What is wrong with a model folder's config.json (None when it can build, and `for_inference` feed, the
    network): the keys predict and evaluate read, with their types, and a normalisation that cannot turn pixels
    into NaN or Inf."""
    if not isinstance(config, dict):
        return f"it holds a JSON {type(config).__name__}, not an object"
    if not isinstance(config.get("name"), str) or not config["name"]:
        return "no network `name`"
    for key in ("in_channels", "num_classes"):
        if not _positive_int(config.get(key)):
            return f"`{key}` is {config.get(key)!r}, not a positive integer"
    if not isinstance(config.get("kwargs", {}), dict):
        return "`kwargs` is not an object"
    threshold = config.get("mask_threshold")
    if threshold is not None and not (isinstance(threshold, int) and not isinstance(threshold, bool)):
        return f"`mask_threshold` is {threshold!r}, not an integer or null"
    if not for_inference:  # rebuilding the network needs no preprocessing (save_model's `extra` may lack it)
        return None
    prep = config.get("preprocessing")
    if not isinstance(prep, dict):
        return "no `preprocessing` object (the input size and normalisation the network was trained with)"
    size = prep.get("size")
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) for v in size)):
        return f"`preprocessing.size` is {size!r}, not two positive integers"
    if prep.get("in_channels") != config["in_channels"]:
        return f"`preprocessing.in_channels` {prep.get('in_channels')!r} differs from `in_channels` " \
               f"{config['in_channels']}"
    crop = prep.get("crop")
    if crop is not None and not (isinstance(crop, list) and len(crop) == 2 and all(_positive_int(v) for v in crop)):
        return f"`preprocessing.crop` is {crop!r}, not two positive integers or null"
    tiling = config.get("tiling")
    if tiling is not None and not (isinstance(tiling, dict) and (_positive_int(tiling.get("tile")) or (
            isinstance(tiling.get("tile"), list) and len(tiling["tile"]) == 2
            and all(_positive_int(v) for v in tiling["tile"])))):
        return f"`tiling` is {tiling!r}, not {{tile: N or [H, W], overlap: fraction}}"
    norm = prep.get("normalize", "imagenet")
    if isinstance(norm, str):
        return None if norm in NORMALISATIONS else f"`preprocessing.normalize` is {norm!r}, not one of " \
                                                   f"{', '.join(NORMALISATIONS)} or {{mean, std}}"
    channels = (1, config["in_channels"])
    if not (isinstance(norm, dict) and _numbers(norm.get("mean")) and _numbers(norm.get("std"))
            and len(norm["mean"]) in channels and len(norm["std"]) in channels):
        return "`preprocessing.normalize` is not {mean: [...], std: [...]} with one number or one per channel"
    problem = statistics_problem(norm["mean"], norm["std"])
    return f"stored normalisation {problem}" if problem else None


def read_threshold(folder: str | Path) -> float | None:
    """The tuned decision threshold of a model folder (`threshold.json`), or None when it has none."""
    file = Path(folder) / THRESHOLD_NAME
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8")).get("threshold")
    except (ValueError, UnicodeDecodeError, AttributeError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise MedsegError(f"{file} is damaged (no `threshold` strictly between 0 and 1); run `medseg tune-threshold` "
                          "again or delete the file to use 0.5")
    return float(value)


def model_folder(path: str | Path) -> Path:
    """The model folder `path` or `path/model`; a folder with one of its two files names the missing one."""
    path = Path(path)
    for candidate in (path, path / "model"):
        present = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (candidate / name).is_file()]
        if len(present) == 2:
            return candidate
        if present:
            missing = WEIGHTS_NAME if present == [CONFIG_NAME] else CONFIG_NAME
            raise MedsegError(f"model folder {candidate} has {present[0]} but no {missing}; {RESTORE}")
    if not path.exists():
        raise MedsegError(f"{path} does not exist; give a run folder or its model folder")
    raise MedsegError(f"no saved model in {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} there "
                      f"or in {path / 'model'}; train a run first (`medseg train`)")


def saved_options(config: dict[str, Any]) -> dict[str, Any]:
    """The options that rebuild the network of a model folder's config.json, the defaults of its format included."""
    old = {}
    for last_format, changed in sorted(CHANGED_DEFAULTS.items(), reverse=True):  # the oldest format's value wins
        if config.get("format", FORMAT_VERSION) <= last_format:
            old |= changed.get(config["name"], {})
    return old | config.get("kwargs", {})


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> SegmentationNetwork:
    """Rebuild a saved network (a model folder or a run folder) in eval mode. A weights file that cannot be read,
    does not fit the network, or holds NaN / Inf values is refused in one line that names it."""
    folder = model_folder(path)
    config = read_model_config(folder)
    weights = folder / WEIGHTS_NAME
    try:
        model = create_model(config["name"], config["in_channels"], config["num_classes"], **saved_options(config))
    except (MedsegError, TypeError, ValueError) as exc:  # an unknown name or option, a value of the wrong type
        raise MedsegError(f"{folder / CONFIG_NAME} does not build a network ({' '.join(str(exc).split())}); "
                          f"{RESTORE}") from None
    try:
        missing, unexpected = _load_weights(model, str(weights), strict=False, device=str(map_location))
    except RuntimeError as exc:  # torch's load_state_dict: tensors of another shape
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise MedsegError(f"{weights} does not match network {config['name']!r} of {folder / CONFIG_NAME} "
                          f"({first[:200]}); {RESTORE}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error (truncated, not safetensors at all)
        problem = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise MedsegError(f"cannot read {weights} ({problem}): the file is truncated or not a safetensors file; "
                          f"{RESTORE}") from None
    if missing or unexpected:
        raise MedsegError(f"{weights} does not match network {config['name']!r}: "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if bad:
        first = next(iter(bad))
        raise MedsegError(f"{weights} holds {sum(bad.values())} NaN or Inf value(s) in {len(bad)} tensor(s) (first "
                          f"{first!r}): such a network predicts nothing useful; train the run again (a lower "
                          "optim.lr keeps the loss finite)")
    return model.eval()
