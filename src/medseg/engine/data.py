"""A run's training data as a `LightningDataModule`: the data folder's layout, the data check, the splits,
the dataset statistics of `data.normalize: dataset`, STS-Net amplification and the train / val loaders.

Everything that can be wrong with the data is found when the module is built, before `train` creates the
run folder: a folder with any error, a split naming cases the folder lacks, an empty training or
validation split, training images of one intensity. What the run folder records about the data (the
splits, the resolved recipe, the amplification plan) is ready on the module by then: `splits`,
`split_source`, `recipe`, `amplification`.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from medseg.config import NormalizeStats, Recipe
from medseg.data.amplify import AmplifiedCase, given_thresholds
from medseg.data.amplify import manifest as amplify_manifest
from medseg.data.amplify import plan as plan_amplification
from medseg.data.cache import DecodedCache, default_cache_folder
from medseg.data.check import check_data
from medseg.data.dataset import EpochShuffle, MultiScaleCollate, SegmentationDataset, intensity_statistics
from medseg.data.folds import split_groups
from medseg.data.formats import Layout, discover
from medseg.data.splits import cases_for, check_splits, make_splits
from medseg.data.transforms import Preprocessing, build_augmentation
from medseg.engine.callbacks import say
from medseg.errors import MedsegError


def decoded_cache(recipe: Recipe) -> DecodedCache | None:
    """The decoded-data cache at the recipe's size, or at native size with `data.crop` (None with
    `data.cache: false`)."""
    if not recipe.data.cache:
        return None
    size = None if recipe.data.crop_hw else recipe.data.hw
    return DecodedCache(default_cache_folder(), size, recipe.model.in_channels, recipe.model.num_classes,
                        recipe.data.mask_threshold)


def default_workers() -> int:
    """Loader workers when the recipe leaves `data.num_workers` unset: one core left to the main process.
    Cores are those this process may run on (a container's or `taskset`'s share), not the machine's."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, usable - 1))


def preprocessing_of(recipe: Recipe) -> Preprocessing:
    normalize = recipe.data.normalize
    normalize = normalize.model_dump() if isinstance(normalize, NormalizeStats) else normalize
    return Preprocessing(size=recipe.data.hw, in_channels=recipe.model.in_channels, normalize=normalize,
                         crop=recipe.data.crop_hw)


class SegmentationDataModule(L.LightningDataModule):
    """The data of one training run, checked and planned on construction (see the module docstring).

    `splits`: the stems of a run that is resumed or joined (its splits.json); None draws them from the folder
    (its own splits.json, nnU-Net's imagesTs, or a seeded split by `data.split`). With `given_source`, `splits`
    are instead the stems a caller chose for a new run (a cross-validation fold, say; they win over the folder's
    own splits.json): checked as a folder's splits.json is and recorded with that label as their source.
    `recipe` is the recipe to train with: `data.normalize: dataset` is replaced by the training split's
    {mean, std}.
    """

    def __init__(self, recipe: Recipe, root: str | Path, splits: dict[str, list[str]] | None = None,
                 given_source: str | None = None):
        super().__init__()
        self.root = Path(root)
        self.layout: Layout = discover(self.root)
        check_folder(self.layout, recipe)
        self.grouped_by = ""  # how a new seeded split kept volumes / patients whole (split_groups), for the header
        if splits is None:
            split, groups = recipe.data.split, None
            if not (self.root / "splits.json").is_file():  # the folder's own splits are taken as they are
                groups, self.grouped_by = split_groups(self.layout, split.groups)
            self.splits, self.split_source = make_splits(self.layout, split.val, split.test, split.seed, groups,
                                                         self.grouped_by)
        elif given_source is None:
            self.splits, self.split_source = splits, "run splits.json"
        else:
            known = {c.stem for c in self.layout.cases + self.layout.test_cases}
            self.splits = check_splits(splits, known, f"the splits {given_source!r}",
                                       f"pass stems of {self.root} (`medseg check-data {self.root}` lists its cases)")
            self.split_source = given_source
        require_cases(self.layout, self.splits)
        self.recipe = with_dataset_statistics(recipe, self.layout, self.splits["train"])
        self.views: list[AmplifiedCase] = []
        self.amplification: dict | None = None  # RUN/amplify.json's record
        if recipe.data.amplify:
            self.views, self.amplification = amplified_views(self.layout, self.splits, recipe)
        build_augmentation(recipe.data.augment, recipe.data.train_hw)  # a mistake in data.augment stops train here
        self.train_set: SegmentationDataset | None = None
        self.val_set: SegmentationDataset | None = None
        self.first_epoch = 0  # the 0-based epoch training starts at (a resumed run's next epoch)

    def training_images(self) -> int:
        """Images of one training epoch: the training split (times `data.crops_per_image`) plus amplified views."""
        return len(self.splits["train"]) * self.recipe.data.crops_per_image + len(self.views)

    def counts(self) -> str:
        return " / ".join(f"{len(self.splits[name])} {name}" for name in ("train", "val", "test"))

    def setup(self, stage: str) -> None:
        common = {"preprocessing": preprocessing_of(self.recipe), "num_classes": self.recipe.model.num_classes,
                  "mask_threshold": self.recipe.data.mask_threshold, "cache": decoded_cache(self.recipe)}
        # data.crops_per_image: each case listed that many times, each listing drawing its own crop and augmentation
        train_cases = cases_for(self.layout, self.splits["train"]) * self.recipe.data.crops_per_image
        self.train_set = SegmentationDataset([*train_cases, *self.views],
                                             augment=self.recipe.data.augment, seed=self.recipe.train.seed,
                                             random_crop=True, **common)
        self.val_set = SegmentationDataset(cases_for(self.layout, self.splits["val"]), **common)

    def _loader_options(self) -> dict:
        workers = self.recipe.data.num_workers if self.recipe.data.num_workers is not None else default_workers()
        # a loader generator of its own: starting workers must not draw from the global RNG, which a resumed run
        # restores from its checkpoint (dropout and the like draw from it)
        return {"batch_size": self.recipe.train.batch_size, "num_workers": workers, "persistent_workers": workers > 0,
                "pin_memory": torch.cuda.is_available(), "generator": torch.Generator().manual_seed(0)}

    def train_dataloader(self) -> DataLoader:
        dataset = self._built(self.train_set)
        multiscale = self.recipe.data.multiscale
        # the order and the augmentation of epoch e depend on (seed, e) alone: a resumed run trains on the batches
        # the uninterrupted run would have (EpochShuffle). Lightning asks for this loader (and a multi-worker
        # loader draws its first indices) before it restores the epoch or calls set_epoch: `first_epoch` says it.
        sampler = EpochShuffle(len(dataset), self.recipe.train.seed, self.first_epoch)
        # a last batch of one image would break BatchNorm: dropped whenever the split fills more than one batch
        return DataLoader(dataset, sampler=sampler, drop_last=len(dataset) > self.recipe.train.batch_size,
                          collate_fn=MultiScaleCollate(multiscale) if multiscale else None, **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._built(self.val_set), shuffle=False, **self._loader_options())

    def _built(self, dataset: SegmentationDataset | None) -> SegmentationDataset:
        if dataset is None:
            raise RuntimeError("SegmentationDataModule.setup() has not run; the trainer calls it in fit()")
        return dataset


def check_folder(layout: Layout, recipe: Recipe) -> None:
    """Refuse a folder with any error (the whole folder, not only the split: a missing mask is a mistake)."""
    report = check_data(layout.root, recipe.model.num_classes, recipe.data.mask_threshold)
    if report.errors:
        first = report.errors[0]
        raise MedsegError(f"{layout.root}: {first.line()} — run `medseg check-data {layout.root}` "
                          f"to see all {len(report.errors)} problem(s)")


def require_cases(layout: Layout, splits: dict[str, list[str]]) -> None:
    """The training and validation stems are in the folder (a resumed run's data may have changed), and
    neither split is empty."""
    for name in ("train", "val"):
        cases_for(layout, splits[name])
    if not splits["train"]:
        raise MedsegError("the training split is empty; list train stems in splits.json")
    if not splits["val"]:
        raise MedsegError("the validation split is empty; set data.split.val > 0 or list val stems in splits.json")


def with_dataset_statistics(recipe: Recipe, layout: Layout, train_stems: list[str]) -> Recipe:
    """Replace `data.normalize: dataset` by the training split's {mean, std}, so the run's config.yaml and
    model carry the numbers and evaluate / predict z-score new images exactly as training did. Any other
    normalisation is returned as it is."""
    if recipe.data.normalize != "dataset":
        return recipe
    raw = Preprocessing(size=recipe.data.hw, in_channels=recipe.model.in_channels, normalize="none",
                        crop=recipe.data.crop_hw)
    mean, std = intensity_statistics(cases_for(layout, train_stems), raw, decoded_cache(recipe),
                                     recipe.model.num_classes, recipe.data.mask_threshold)
    if std <= 0:
        raise MedsegError(f"{layout.root}: the training images are all one intensity (std 0); "
                          "data.normalize: dataset cannot z-score them, choose another normalisation")
    say(f"normalisation: training split mean {mean:.4f}, std {std:.4f} (stored in the run)")
    stats = NormalizeStats(mean=[mean], std=[std])
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"normalize": stats})})


def amplified_views(layout: Layout, splits: dict[str, list[str]], recipe: Recipe) -> tuple[list[AmplifiedCase], dict]:
    """STS-Net amplification of the training split only: the views, and the plan that goes to RUN/amplify.json."""
    cfg = recipe.data.amplify
    given = given_thresholds(cfg.n1, cfg.n2, "given in the recipe")
    thresholds, views, lesions = plan_amplification(layout, splits["train"], given, recipe.model.num_classes,
                                                    recipe.data.mask_threshold, cfg.seed, cfg.border, cfg.method,
                                                    recipe.data.hw)
    say(f"amplification (method {cfg.method}): N1 {thresholds.n1}, N2 {thresholds.n2} at "
        f"{recipe.data.hw[0]}x{recipe.data.hw[1]}; "
        f"{len({v.case.stem for v in views})} of {len(splits['train'])} training images qualify, "
        f"{len(views)} views added")
    return views, amplify_manifest(thresholds, views, lesions, cfg.seed, cfg.border, cfg.method, recipe.data.hw)
