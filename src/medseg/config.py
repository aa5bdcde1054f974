"""Recipes: YAML files validated by pydantic, with `--set a.b=c` overrides (our format).

A recipe names one paper setting completely: model, data (size, normalisation, augmentation, split),
loss terms, optimiser, schedule, training length, evaluation protocol. Built-in recipes live in
`medseg/recipes/<name>.yaml`; any YAML path works too. Unknown keys are errors (a typo must not be
silently ignored), except under `model:` where extra keys are the network's own options.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medseg.data.transforms import NORMALIZATIONS, build_augmentation, statistics_problem
from medseg.errors import MedsegError
from medseg.losses.registry import check_loss_options
from medseg.metrics.protocols import PROTOCOLS

# Names a recipe may use, derived from the registries that give them meaning: a typo fails when the recipe
# loads, before any data is read, not at the end of a 100-epoch run.
ProtocolName = Literal[tuple(sorted(PROTOCOLS))]  # type: ignore[valid-type]
NormalizeName = Literal[NORMALIZATIONS]  # type: ignore[valid-type]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    in_channels: int = Field(3, ge=1)
    num_classes: int = Field(1, ge=1)
    weights: str | None = None  # local file that initialises the whole network (fine-tuning); nothing downloads

    def options(self) -> dict[str, Any]:
        """The network's own options (every key besides the common ones)."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _registered(self) -> "ModelConfig":
        """The network exists and takes every option given (checked against the registry, nothing is built)."""
        from medseg.models import model_info

        try:
            info = model_info(self.name)
        except MedsegError as exc:
            raise ValueError(str(exc)) from None
        allowed = info.options()
        unknown = sorted(k for k in self.options() if k not in allowed)
        if unknown:
            raise ValueError(f"model {self.name!r} has no option {', '.join(unknown)}; "
                             f"its options are: {', '.join(allowed) or 'none'}")
        return self


class NormalizeStats(Strict):
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _usable(self) -> "NormalizeStats":
        problem = statistics_problem(self.mean, self.std)  # a std of 0 or NaN would train a network of NaN weights
        if problem:
            raise ValueError(problem)
        return self


class SplitConfig(Strict):
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)
    seed: int = 0
    # regex naming each stem's patient / volume (medseg.data.folds.groups_of): no group in two splits; None:
    # slices of a `medseg slices` folder are grouped by volume, any other folder's stems are split one by one
    groups: str | None = None


class AmplifyConfig(Strict):
    """STS-Net's amplification blocks on the training split (medseg.data.amplify); lesions are counted at
    `data.size`."""

    method: Literal[1, 2, 3, 4] = 4  # paper Table 7; 4 is the final STS-Net's
    n1: int | None = None  # thresholds: None = computed from the training masks (n2 from n1 by Eq. 2 if only n1)
    n2: int | None = None
    border: int = 50
    seed: int = 0


class DataConfig(Strict):
    size: Union[int, tuple[int, int]] = 256  # training / inference size (H, W); an int means square
    # train on random crops (H, W) of the images at their own resolution instead of resizing them to `size`
    # (medseg.data.dataset); inference then tiles by default with tiles of this size (medseg.engine.inference)
    crop: Union[int, tuple[int, int], None] = None
    crops_per_image: int = Field(1, ge=1)  # with crop: random crops of each training image per epoch (ours)
    multiscale: list[int] | None = None  # per-batch random square size (M2SNet)
    # "dataset": z-score with one mean / std of the training split, computed at the start of training and
    # stored in the run's config.yaml and model as {mean: [m], std: [s]} (FocusNet)
    normalize: Union[NormalizeName, NormalizeStats] = "imagenet"
    augment: list[Union[str, dict[str, Any]]] = Field(default_factory=list)
    mask_threshold: int | None = None  # binary masks: foreground = raw value > threshold (JPEG-noisy masks)
    split: SplitConfig = Field(default_factory=SplitConfig)
    amplify: AmplifyConfig | None = None  # STS-Net amplification of small-lesion training images (None: off)
    num_workers: int | None = None  # None: one less than the CPU cores, at most 8
    # decode and resize each training image once, into $MEDSEG_CACHE (default ~/.cache/medseg/decoded)
    cache: bool = True

    @property
    def hw(self) -> tuple[int, int]:
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    @property
    def crop_hw(self) -> tuple[int, int] | None:
        """`crop` as (H, W), None when training resizes whole images."""
        if self.crop is None:
            return None
        return (self.crop, self.crop) if isinstance(self.crop, int) else tuple(self.crop)

    @property
    def train_hw(self) -> tuple[int, int]:
        """The size of the images the network trains on: the crop, else `size`."""
        return self.crop_hw or self.hw

    @model_validator(mode="after")
    def _known_augmentations(self) -> "DataConfig":
        try:
            build_augmentation(self.augment, self.train_hw)
        except MedsegError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _crop_alone(self) -> "DataConfig":
        """A crop is cut at the image's own resolution: per-batch resizing (multiscale) and STS-Net's amplified
        views (cut and resized to `size`) train on another scale, so they do not combine with it."""
        if self.crop_hw is not None:
            if min(self.crop_hw) < 1:
                raise ValueError(f"crop must be positive, got {self.crop}")
            if self.multiscale:
                raise ValueError("crop and multiscale do not combine (crops are at native resolution); drop one")
            if self.amplify is not None:
                raise ValueError("crop and amplify do not combine (amplified views are resized to data.size); "
                                 "drop one")
        elif self.crops_per_image > 1:
            raise ValueError("crops_per_image needs data.crop (random crops per image); set data.crop or drop it")
        return self


class LossTerm(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    weight: float = 1.0

    @model_validator(mode="after")
    def _registered(self) -> "LossTerm":
        try:
            check_loss_options(self.name, dict(self.model_extra or {}))
        except MedsegError as exc:
            raise ValueError(str(exc)) from None
        return self


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw", "nadam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adam / adamw / nadam
    eps: float = 1e-8
    group_lr: dict[str, float] = Field(default_factory=dict)  # lr multiplier per model.param_groups() name
    kernel_l2: float = Field(0.0, ge=0)  # Keras-style L2 added to the loss: kernel_l2 * sum(w^2) of conv kernels


class ScheduleConfig(Strict):
    name: Literal["none", "step", "multistep", "cosine", "poly", "plateau", "warmup_linear"] = "none"
    interval: Literal["epoch", "step"] = "epoch"  # when cosine / poly / warmup_linear advance
    step_size: int = 30  # step
    gamma: float = 0.1  # step, multistep
    milestones: list[int] = Field(default_factory=lambda: [30])  # multistep: epochs after which lr x gamma
    min_lr: float = 0.0  # cosine, plateau
    power: float = 0.9  # poly
    warmup_epochs: float | None = None  # warmup_linear: peak position; None = (epochs + 1) / 2, a triangle
    factor: float = 0.1  # plateau
    patience: int = 10  # plateau
    threshold: float = 1e-4  # plateau
    threshold_mode: Literal["rel", "abs"] = "rel"  # plateau: "abs" is Keras' min_delta
    monitor: str = "val/loss"  # plateau
    mode: Literal["min", "max"] = "min"  # plateau


    @field_validator("milestones")
    @classmethod
    def _increasing(cls, milestones: list[int]) -> list[int]:
        if not milestones or milestones[0] < 1 or any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be increasing epochs >= 1, e.g. [30] or [30, 60]; got {milestones}")
        return milestones

class EarlyStopping(Strict):
    patience: int = Field(ge=1)
    min_delta: float = 0.0


class FreezeConfig(Strict):
    """Keep parameter groups (names of the network's `param_groups()`, e.g. encoder) frozen, weights and
    BatchNorm statistics, for the first `epochs` epochs, then train them (Fovea-UNet's backbone schedule)."""

    groups: list[str] = Field(min_length=1)
    epochs: int = Field(ge=1)


class TrainConfig(Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    monitor: str = "val/dice"  # what `best` means
    monitor_mode: Literal["max", "min"] = "max"
    # auto: bf16 + channels_last on a CPU with BF16 instructions, bf16/16-mixed on CUDA, else fp32
    # (medseg.engine.precision); bf16-mixed on a CPU always goes with channels_last
    precision: Literal["auto", "32", "16-mixed", "bf16-mixed"] = "auto"
    early_stopping: EarlyStopping | None = None
    deep_supervision_weights: list[float] | None = None  # one weight per output; None: 1 each
    extra_loss_weights: dict[str, float] = Field(default_factory=dict)  # weights of the network's extra_losses(mask)
    gradient_clip: float | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"  # value: clamp each gradient element (PraNet's code)
    freeze: FreezeConfig | None = None  # e.g. {groups: [encoder], epochs: 30}
    # Where each epoch's numbers go. csv is always on (RUN/metrics.csv, which RUN/curves.png is drawn from) and
    # is put first when missing; tensorboard writes RUN/tensorboard/, mlflow a local store in RUN/mlruns/ (no
    # server). Both are optional extras: pip install 'medseg[tensorboard]' / 'medseg[mlflow]'.
    loggers: list[Literal["csv", "tensorboard", "mlflow"]] = Field(default_factory=lambda: ["csv"])

    @field_validator("precision", mode="before")
    @classmethod
    def _precision_text(cls, precision: Any) -> Any:
        # `--set train.precision=32` reaches here as the YAML integer 32
        return str(precision) if isinstance(precision, int) and not isinstance(precision, bool) else precision

    @field_validator("loggers")
    @classmethod
    def _csv_always(cls, loggers: list[str]) -> list[str]:
        return list(dict.fromkeys(["csv", *loggers]))


class TilingConfig(Strict):
    """Sliding-window inference at native resolution (medseg.engine.inference): tile (H, W) and overlap."""

    tile: Union[int, tuple[int, int]]
    overlap: float = Field(0.5, ge=0, lt=1)

    @field_validator("tile")
    @classmethod
    def _positive(cls, tile: int | tuple[int, int]) -> int | tuple[int, int]:
        if min((tile, tile) if isinstance(tile, int) else tile) < 1:
            raise ValueError(f"tile must be positive, e.g. 256 or [256, 320]; got {tile}")
        return tile


class PostprocessConfig(Strict):
    """Post-processing of predicted labels (medseg.engine.postprocess), used by evaluate and predict."""

    largest_component: bool = False
    min_size: int = Field(0, ge=0)  # components smaller than this many pixels are dropped
    fill_holes: bool = False


class EvalConfig(Strict):
    protocol: ProtocolName = "paper"  # a metric protocol of medseg.metrics.protocols
    # None: tiles of data.crop when the network trained on crops, else whole images resized to data.size
    tiling: TilingConfig | None = None
    checkpoint: Literal["best", "last"] = "best"  # which weights the run exports to model/
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)


class Recipe(Strict):
    name: str = "custom"
    description: str = ""
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    loss: list[LossTerm]
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("loss")
    @classmethod
    def _loss_not_empty(cls, terms: list[LossTerm]) -> list[LossTerm]:
        if not terms:
            raise ValueError("give at least one loss term")
        return terms

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def list_recipes() -> list[str]:
    folder = resources.files("medseg") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_recipe_yaml(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    """(recipe name, raw mapping) for a built-in name or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise MedsegError(f"recipe {path} is a folder; give a recipe YAML file or a built-in name "
                              f"({', '.join(list_recipes())})")
        if not path.is_file():
            raise MedsegError(f"recipe file {path} does not exist; give a built-in name "
                              f"({', '.join(list_recipes())}) or a YAML path")
        try:
            text, name = path.read_text(encoding="utf-8"), path.stem
        except (OSError, UnicodeDecodeError) as exc:
            raise MedsegError(f"recipe file {path} cannot be read as text ({exc.__class__.__name__}); give a "
                              "recipe YAML file") from None
    else:
        resource = resources.files("medseg") / "recipes" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise MedsegError(f"unknown recipe {name_or_path!r}; built-in recipes: "
                              f"{', '.join(list_recipes())} (or give a YAML path)")
        text, name = resource.read_text(), str(name_or_path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise MedsegError(f"recipe {name}: invalid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise MedsegError(f"recipe {name}: the file must hold a mapping of sections (model, data, loss, ...)")
    return name, raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML, so numbers, lists and booleans work) in place."""
    if "=" not in assignment:
        raise MedsegError(f"--set {assignment!r}: expected key=value, e.g. --set train.epochs=2")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    assign(raw, key, value)


def assign(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (e.g. `loss.1.smooth`) of a raw recipe mapping to an already parsed `value`."""
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise MedsegError(f"--set {key}: {'.'.join(parts[:i]) or 'root'} is a list of {len(node)}; "
                                  f"use an index 0..{len(node) - 1}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise MedsegError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def validate_recipe(name: str, raw: dict[str, Any]) -> Recipe:
    raw = {k: v for k, v in raw.items() if k != "run"}  # a run's config.yaml is a recipe plus its run record
    try:
        return Recipe.model_validate({**raw, "name": raw.get("name", name)})
    except ValidationError as exc:
        errors = exc.errors()
        # a mapping given for a name-or-mapping setting (data.normalize): its own problem, not "not a name"
        first = next((e for e in errors if not (e["type"] == "literal_error" and isinstance(e["input"], dict))),
                     errors[0])
        # the union members pydantic names in a location (literal[...], NormalizeStats) are not recipe keys
        where = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p[:1].isupper())))
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        if first["type"] == "value_error":  # our own checks: the message says it all
            what = first["msg"].removeprefix("Value error, ")
        else:
            what = f"{first['msg']}, got {first.get('input')!r}"
        raise MedsegError(f"recipe {name}: {where}: {what}{more}") from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    name, raw = read_recipe_yaml(name_or_path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(name, raw)


def recipe_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Rebuild a recipe stored in a run's config.yaml (resume), with optional overrides on top."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # a deep copy
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate_recipe(raw.get("name", "custom"), raw)
