"""Train / val / test splits: the data folder's own `splits.json`, nnU-Net's imagesTs, or a seeded split.

Whatever the source, the exact stems are written into the run folder (`splits.json`), so evaluation
and later readers use the same cases.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path

from medseg.data.formats import Case, Layout
from medseg.errors import MedsegError

SPLIT_NAMES = ("train", "val", "test")


def read_splits(path: Path, known: set[str]) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise MedsegError(f"cannot read {path}: {reason}; it must be JSON with train/val/test stem lists") from None
    if not isinstance(raw, dict) or "train" not in raw or "val" not in raw:
        raise MedsegError(f"{path} must be a JSON object with 'train' and 'val' (and optionally 'test') stem lists")
    return check_splits(raw, known, str(path), "fix the file or run `medseg check-data` on the folder")


def check_splits(raw: Mapping, known: set[str], where: str, fix: str) -> dict[str, list[str]]:
    """`raw` as {train, val, test} stem lists (test may be absent), checked as a folder's splits.json is: stem
    lists, every stem one of `known` (the folder's cases), no stem in two splits. `where` names the splits and
    `fix` says what to do in the one-line error."""
    if not isinstance(raw, Mapping) or "train" not in raw or "val" not in raw:
        raise MedsegError(f"{where} must have 'train' and 'val' (and optionally 'test') stem lists")
    for name in SPLIT_NAMES:
        if not isinstance(raw.get(name, []), (list, tuple)):
            raise MedsegError(f"{where}: {name!r} is a {type(raw[name]).__name__}, not a list of stems")
    splits = {name: [str(s) for s in raw.get(name, [])] for name in SPLIT_NAMES}
    unknown = sorted({s for stems in splits.values() for s in stems} - known)
    if unknown:
        raise MedsegError(f"{where} names {len(unknown)} stems that have no image/mask pair, e.g. {unknown[:3]}; "
                          f"{fix}")
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        for stem in splits[name]:
            if stem in seen:
                raise MedsegError(f"{where}: stem {stem!r} is in both {seen[stem]!r} and {name!r}")
            seen[stem] = name
    return splits


def differing_splits(a: Mapping, b: Mapping) -> list[str]:
    """The split names whose stem sets differ between two {train, val, test} mappings (order does not count)."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return list(SPLIT_NAMES)
    return [name for name in SPLIT_NAMES if {str(s) for s in a.get(name, [])} != {str(s) for s in b.get(name, [])}]


def seeded_split(stems: list[str], val: float, test: float, seed: int) -> dict[str, list[str]]:
    """Shuffle with `seed` and cut; a non-zero fraction gets at least one case."""
    order = sorted(stems)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_test = max(1, round(n * test)) if test > 0 else 0
    n_val = max(1, round(n * val)) if val > 0 else 0
    if n - n_test - n_val < 1:
        raise MedsegError(f"{n} cases are too few for val={val} and test={test}; add data or lower data.split")
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def make_splits(layout: Layout, val: float, test: float, seed: int) -> tuple[dict[str, list[str]], str]:
    """(splits, where they came from) for a data folder."""
    own = layout.root / "splits.json"
    if own.is_file():
        return read_splits(own, {c.stem for c in layout.cases + layout.test_cases}), str(own)
    if layout.test_cases:
        splits = seeded_split([c.stem for c in layout.cases], val, 0.0, seed)
        splits["test"] = sorted(c.stem for c in layout.test_cases)
        return splits, f"seeded split (seed {seed}) of imagesTr; test = imagesTs with labelsTs"
    return seeded_split([c.stem for c in layout.cases], val, test, seed), f"seeded split (seed {seed})"


def cases_for(layout: Layout, stems: list[str]) -> list[Case]:
    by_stem = {c.stem: c for c in layout.cases + layout.test_cases}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise MedsegError(f"{len(missing)} cases of the split are not in {layout.root}, e.g. {missing[:3]}; "
                          "was the data folder changed after training?")
    return [by_stem[s] for s in stems]
