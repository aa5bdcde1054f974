"""The run folder, our layout: written by `train`, read by everything else.

    runs/<name>/config.yaml     the resolved recipe (a valid recipe itself) plus a `run:` section
    runs/<name>/splits.json     the exact stems of train / val / test
    runs/<name>/metrics.csv     one row per epoch (Lightning's CSV logger)
    runs/<name>/curves.png      losses, the monitored metric and the learning rate per epoch
    runs/<name>/amplify.json    STS-Net amplification plan (recipes with data.amplify)
    runs/<name>/tensorboard/    event files; mlruns/ a local MLflow store (train.loggers)
    runs/<name>/checkpoints/    last.ckpt, best.ckpt (Lightning; for resuming only)
    runs/<name>/model/          config.json + model.safetensors (what predict / evaluate load)
    runs/<name>/eval/<data>/    per_case.csv, summary.json, report.md, overlays/
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from medseg.config import Recipe, recipe_from_dict
from medseg.errors import MedsegError


class Run:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.yaml")
    splits_file = property(lambda self: self.path / "splits.json")
    metrics_file = property(lambda self: self.path / "metrics.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.ckpt")
    best_checkpoint = property(lambda self: self.path / "checkpoints" / "best.ckpt")
    model_dir = property(lambda self: self.path / "model")

    def eval_dir(self, name: str) -> Path:
        return self.path / "eval" / name

    def require(self) -> "Run":
        if not self.config_file.is_file():
            raise MedsegError(f"{self.path} is not a medseg run folder (no config.yaml); "
                              "give the folder `medseg train` wrote")
        return self

    def config(self) -> dict[str, Any]:
        """config.yaml as a mapping with a `run:` record; a damaged file is named in one line."""
        path = self.require().config_file
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MedsegError(f"{path} is not a readable run config ({problem}); medseg writes plain YAML "
                              "there: restore the file or train the run again") from None
        if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
            raise MedsegError(f"{path} is not a medseg run config (no `run:` section); restore the file or train "
                              "the run again")
        return config

    def recipe(self, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        return recipe_from_dict(self.config(), overrides)

    def data_root(self) -> Path:
        data = self.config()["run"].get("data")
        if not isinstance(data, str) or not data:
            raise MedsegError(f"{self.config_file} does not record the data folder the run was trained on "
                              "(`run.data`); restore the file or train the run again")
        return Path(data)

    def splits(self) -> dict[str, list[str]]:
        if not self.splits_file.is_file():
            raise MedsegError(f"{self.splits_file} is missing; the run folder is incomplete")
        try:
            splits = json.loads(self.splits_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            splits = None
        if not isinstance(splits, dict) or not all(isinstance(splits.get(k), list) for k in ("train", "val", "test")):
            raise MedsegError(f"{self.splits_file} is damaged (medseg writes JSON lists of train / val / test stems "
                              "there); restore the file or train the run again")
        return splits


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "data"


def _numbered(out: Path, base: str) -> list[tuple[int, Path]]:
    found = []
    for candidate in out.glob(f"{base}*") if out.is_dir() else []:
        match = re.fullmatch(re.escape(base) + r"(?:-(\d+))?", candidate.name)
        if match and candidate.is_dir():
            found.append((int(match.group(1) or 1), candidate))
    return sorted(found)


def new_run_dir(out: Path, base: str) -> Path:
    """OUT/base, or OUT/base-2, -3, ... when taken."""
    taken = _numbered(out, base)
    return out / (base if not taken else f"{base}-{taken[-1][0] + 1}")


def numbered_run_dirs(out: Path, base: str) -> list[Path]:
    """OUT/base, OUT/base-2, ... that exist, in number order."""
    return [path for _, path in _numbered(out, base)]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("medseg", "torch", "torchvision", "lightning", "timm", "segmentation-models-pytorch"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    """The commit of the medseg checkout in use (None when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        result = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return result.stdout.strip() + ("+dirty" if dirty else "")


def now() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
