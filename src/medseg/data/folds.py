"""Grouped, stratified k-fold cross-validation: the folds every model of a study trains and is tested on.

Slices of one patient or volume look alike, so they must never be on both sides of a split: a regex on the
file stems names each stem's group (`groups_of`), and `kfold` keeps every group inside one fold. As in
nnU-Net's default 5-fold cross-validation, each fold is the test set once; `fold_splits` carves a validation
set from the remaining training groups, so no group is in two of train / val / test.

The folds are balanced in stems and, given `strata` (a label per stem, e.g. empty / non-empty mask from
`empty_mask_strata`), stratified as far as whole groups allow. The rule, deterministic for a seed and
independent of the order in which stems are given:

1. each group's label is the most common label of its stems (a tie goes to the label rarer over all stems);
   without strata every group has the same label;
2. the groups are sorted by name, shuffled with the seed, then stably sorted by size, largest first;
3. the strata are taken rarest first (fewest stems), their groups in the order of step 2; each group goes to
   the fold that holds the fewest stems of its label, among the folds it fits in without any fold growing
   past the smallest fold's size plus the largest group's size; ties go to the smaller fold, then the lower
   fold number.

Without strata step 3 is the plain greedy "largest group to the currently smallest fold". The size rule
keeps the largest fold at most one largest group above the smallest; within it the rare label is dealt out
round-robin, so with at least k groups of a label every fold gets one of them when that label is the
rarest.

`split_groups` says which groups a folder's default split and folds keep whole: a regex's when one is given,
else, for a folder written by `medseg slices`, the volume of each slice (its slices.json), else none.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping

import numpy as np

from medseg.data.formats import Layout
from medseg.data.io import mask_to_labels, read_mask
from medseg.data.splits import cases_for
from medseg.data.volumes import MANIFEST, slice_volumes
from medseg.errors import MedsegError


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def groups_of(stems: Iterable[str], pattern: str | None) -> dict[str, str]:
    """{stem: group}: the patient / volume id that `pattern` (a Python regex, applied with `re.search`) finds in
    each stem: its named group `group`, else its first group, else the whole match. None: each stem is its own
    group."""
    stems = sorted(set(stems))
    if pattern is None:
        return {stem: stem for stem in stems}
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise MedsegError(f"group pattern {pattern!r} is not a valid regular expression ({_one_line(str(exc))}); "
                          "write a Python regex whose group 'group' (or first group) is the patient id, "
                          "e.g. '^(?P<group>[^_]+)_'") from None
    groups: dict[str, str] = {}
    unmatched: list[str] = []
    for stem in stems:
        match = regex.search(stem)
        if match is None:
            unmatched.append(stem)
            continue
        if "group" in regex.groupindex:
            found = match["group"]
        elif regex.groups:
            found = match.group(1)
        else:
            found = match.group(0)
        if not found:  # an optional group that took no part, or an empty match, names no patient
            unmatched.append(stem)
            continue
        groups[stem] = found
    if unmatched:
        raise MedsegError(f"group pattern {pattern!r} finds no group in stem {unmatched[0]!r} ({len(unmatched)} of "
                          f"{len(stems)} stems do not match); change the pattern so that every stem names its "
                          "patient or volume")
    return groups


def split_groups(layout: Layout, pattern: str | None) -> tuple[dict[str, str] | None, str]:
    """({stem: group} for the folder's cases, or None when nothing groups them; how they were grouped)."""
    stems = sorted(c.stem for c in layout.cases + layout.test_cases)
    if pattern is not None:
        return groups_of(stems, pattern), f"grouped by {pattern!r}: no group in two splits"
    volumes = slice_volumes(layout.root)
    if volumes is None:
        return None, ""
    unknown = [s for s in stems if s not in volumes]
    if unknown:
        raise MedsegError(f"{layout.root / MANIFEST} names no volume for {len(unknown)} slices, e.g. {unknown[0]!r}; "
                          "slice the volumes again, or set data.split.groups to a regex that finds the volume id")
    return {s: volumes[s] for s in stems}, f"grouped by volume ({MANIFEST} of medseg slices): no volume in two splits"


def kfold(stems: Iterable[str], k: int, groups: Mapping[str, str] | None = None,
          strata: Mapping[str, Hashable] | None = None, seed: int = 0) -> list[list[str]]:
    """k disjoint test folds (sorted stem lists) that together hold every stem once; a group never spans two
    folds; balanced in stems and stratified by `strata` as the module docstring describes."""
    members = _members(stems, groups)
    if k < 2:
        raise MedsegError(f"k={k}: cross-validation needs at least 2 folds; choose k >= 2 (nnU-Net uses 5)")
    if k > len(members):
        total = sum(len(m) for m in members.values())
        raise MedsegError(f"k={k} folds need at least {k} groups; the {total} stems form only {len(members)} "
                          "group(s); lower k, add data, or check the group pattern")
    label = _group_labels(members, strata)
    shuffled = sorted(members)
    random.Random(seed).shuffle(shuffled)
    ordered = sorted(shuffled, key=lambda g: -len(members[g]))  # stable: equal sizes keep the seeded order
    stems_of_label = Counter(label[g] for g in members for _ in members[g])
    strata_order = sorted(stems_of_label, key=lambda lab: (stems_of_label[lab], repr(lab)))
    largest = max(len(m) for m in members.values())
    folds: list[list[str]] = [[] for _ in range(k)]
    per_label = [Counter() for _ in range(k)]
    for lab in strata_order:
        for group in (g for g in ordered if label[g] == lab):
            size = len(members[group])
            cap = min(len(f) for f in folds) + largest
            fits = [i for i in range(k) if len(folds[i]) + size <= cap]
            chosen = min(fits, key=lambda i: (per_label[i][lab], len(folds[i]), i))
            folds[chosen].extend(members[group])
            per_label[chosen][lab] += size
    return [sorted(fold) for fold in folds]


def fold_splits(stems: Iterable[str], k: int, groups: Mapping[str, str] | None = None,
                strata: Mapping[str, Hashable] | None = None, seed: int = 0,
                val_fraction: float = 0.1) -> list[dict[str, list[str]]]:
    """For each fold i of `kfold`: {"train", "val", "test": fold i} (sorted stem lists). The validation stems are
    whole groups of fold i's training groups, drawn in a seeded order while they bring the count closer to
    `val_fraction` of the training stems (at least one group; at least one group stays for training)."""
    if not 0 < val_fraction < 1:
        raise MedsegError(f"val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1")
    stems = sorted(set(stems))
    members = _members(stems, groups)
    group_of = {stem: group for group, group_stems in members.items() for stem in group_stems}
    splits = []
    for index, test in enumerate(kfold(stems, k, groups, strata, seed)):
        held_out = {group_of[s] for s in test}
        training = [g for g in sorted(members) if g not in held_out]
        if len(training) < 2:
            raise MedsegError(f"fold {index + 1} of {k} leaves {len(training)} training group(s), too few to also "
                              "hold out a validation group; lower k or add groups")
        random.Random(f"{seed}-val-{index}").shuffle(training)
        n_train = sum(len(members[g]) for g in training)
        target = val_fraction * n_train
        val: list[str] = []
        for group in training[:-1]:  # the last group always stays for training
            size = len(members[group])
            if abs(len(val) + size - target) < abs(len(val) - target):
                val.extend(members[group])
        if not val:
            val = list(members[min(training[:-1], key=lambda g: len(members[g]))])
        val_set = set(val)
        train = [s for g in training for s in members[g] if s not in val_set]
        splits.append({"train": sorted(train), "val": sorted(val), "test": list(test)})
    return splits


def empty_mask_strata(layout: Layout, stems: Iterable[str], num_classes: int,
                      mask_threshold: int | None) -> dict[str, bool]:
    """{stem: the mask has foreground}, each mask read as training reads it (`read_mask` + `mask_to_labels`):
    strata for `kfold`, so that every fold gets its share of empty masks."""
    found = {}
    for case in cases_for(layout, sorted(set(stems))):
        if case.mask is None:
            raise MedsegError(f"case {case.stem} of {layout.root} has no mask; strata need a mask for every case")
        labels = mask_to_labels(read_mask(case.mask), num_classes, mask_threshold, path=case.mask)
        found[case.stem] = bool(np.any(labels))
    return found


def _members(stems: Iterable[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    """{group: its sorted stems}; without `groups` each stem is its own group."""
    members: dict[str, list[str]] = {}
    for stem in sorted(set(stems)):
        if groups is not None and stem not in groups:
            raise MedsegError(f"stem {stem!r} has no group; make groups_of() from the same stems as the folds")
        members.setdefault(str(groups[stem]) if groups is not None else stem, []).append(stem)
    if not members:
        raise MedsegError("no stems to make folds of; the data folder has no image/mask pairs")
    return members


def _group_labels(members: Mapping[str, list[str]], strata: Mapping[str, Hashable] | None) -> dict[str, Hashable]:
    """Each group's majority label (ties: the label rarer over all stems, then the smaller repr); None
    without strata."""
    if strata is None:
        return {group: None for group in members}
    missing = [s for group_stems in members.values() for s in group_stems if s not in strata]
    if missing:
        raise MedsegError(f"stem {missing[0]!r} has no stratum ({len(missing)} stems lack one); "
                          "give a label for every stem")
    overall = Counter(strata[s] for group_stems in members.values() for s in group_stems)
    labels = {}
    for group, group_stems in members.items():
        counts = Counter(strata[s] for s in group_stems)
        labels[group] = min(counts, key=lambda lab: (-counts[lab], overall[lab], repr(lab)))
    return labels
