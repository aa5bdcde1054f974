"""Train / val / test splits: the data folder's own `splits.json`, nnU-Net's imagesTs, or a seeded split.

Whatever the source, the exact stems are written into the run folder (`splits.json`), so evaluation
and later readers use the same cases.

Slices of one volume or patient look alike, so given groups ({stem: group}: a `data.split.groups` regex, or the
volumes of a folder written by `medseg slices`, see `medseg.data.folds.split_groups`) the seeded split keeps
every group whole (`grouped_split`). The rule, deterministic for the seed and independent of the stems' order:
the groups are sorted by name and shuffled with the seed; walking them in that order, test takes each group that
brings its stem count closer to `test` x all stems, then val does the same over the groups left for `val` x all
stems; a non-zero fraction gets at least one group (the first in the order) and at least one group stays for
training. The fractions are therefore approximate, by stems: whole groups cannot hit them exactly.
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


def grouped_split(groups: Mapping[str, str], val: float, test: float, seed: int) -> dict[str, list[str]]:
    """A seeded split of the stems of `groups` ({stem: group}) that keeps each group in one split (the rule is in
    the module docstring)."""
    members: dict[str, list[str]] = {}
    for stem in sorted(groups):
        members.setdefault(str(groups[stem]), []).append(stem)
    needed = 1 + (val > 0) + (test > 0)
    if len(members) < needed:
        raise MedsegError(f"{len(groups)} cases form only {len(members)} group(s) (volumes or patients), too few for "
                          f"val={val} and test={test}, which need {needed} with no group in two splits; add "
                          "volumes, lower data.split.val / data.split.test (0 leaves a split out), or check "
                          "data.split.groups")
    order = sorted(members)
    random.Random(seed).shuffle(order)
    total = len(groups)
    splits: dict[str, list[str]] = {}
    for name, fraction in (("test", test), ("val", val)):
        chosen: list[str] = []
        if fraction > 0:
            target, count = fraction * total, 0
            spare = len(order) - 1 - (name == "test" and val > 0)  # leave a group for train (and one for val)
            for group in order[:spare]:
                size = len(members[group])
                if abs(count + size - target) < abs(count - target):
                    chosen.append(group)
                    count += size
            chosen = chosen or order[:1]
        splits[name] = sorted(s for g in chosen for s in members[g])
        order = [g for g in order if g not in chosen]
    splits["train"] = sorted(s for g in order for s in members[g])
    return {name: splits[name] for name in ("test", "val", "train")}


def make_splits(layout: Layout, val: float, test: float, seed: int, groups: Mapping[str, str] | None = None,
                grouped_by: str = "") -> tuple[dict[str, list[str]], str]:
    """(splits, where they came from) for a data folder. `groups` ({stem: group} for the folder's cases, e.g.
    from `medseg.data.folds.split_groups`, described by `grouped_by`) keeps each group in one seeded split; a
    folder's own splits.json is taken as it is."""
    own = layout.root / "splits.json"
    if own.is_file():
        return read_splits(own, {c.stem for c in layout.cases + layout.test_cases}), str(own)
    stems = [c.stem for c in layout.cases]
    by = f", {grouped_by}" if groups is not None else ""
    if layout.test_cases:
        if groups is None:
            splits = seeded_split(stems, val, 0.0, seed)
        else:
            splits = grouped_split({s: groups[s] for s in stems}, val, 0.0, seed)
        splits["test"] = sorted(c.stem for c in layout.test_cases)
        return splits, f"seeded split (seed {seed}{by}) of imagesTr; test = imagesTs with labelsTs"
    if groups is None:
        return seeded_split(stems, val, test, seed), f"seeded split (seed {seed})"
    return grouped_split({s: groups[s] for s in stems}, val, test, seed), f"seeded split (seed {seed}{by})"


def cases_for(layout: Layout, stems: list[str]) -> list[Case]:
    by_stem = {c.stem: c for c in layout.cases + layout.test_cases}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise MedsegError(f"{len(missing)} cases of the split are not in {layout.root}, e.g. {missing[:3]}; "
                          "was the data folder changed after training?")
    return [by_stem[s] for s in stems]
