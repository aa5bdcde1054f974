"""The network contract: what every medseg network provides, and the optional capabilities the engine
checks with `isinstance` (never `hasattr`).

Every network
- subclasses `SegmentationNetwork` and is built by `medseg.create_model(name, in_channels, num_classes,
  **options)`, which binds its `spec` (how to rebuild it) and its `card` (the registry's metadata);
- returns logits `(B, num_classes, H, W)` at the input size from `forward(x)`; a deeply supervised network
  returns a list (main output first) in training mode, and always one tensor in eval mode;
- has its input size checked against `card.size_multiple` before `forward` (no network checks by hand);
- names its parameter groups with the class attribute `groups` (module-name prefixes per group; the rest
  is `rest_group`), which the recipe's `optim.group_lr` and `train.freeze` refer to.
- lists in `load_reports` what each load of a local weights file did (`medseg.models.pretrained`), for
  the trainer to print and store.

Per-variant metadata is data, a `NetworkCard` in the registry (as timm's `pretrained_cfg`): the paper (title,
venue), the input-size multiple, the default size, the paper's output channels, the classification head's
name, and the pretrained encoder slot (`EncoderCard`: module path, weight family, first conv, the
normalisation its weights expect).

Capabilities, each a mixin class the engine tests with `isinstance`:
- `Prunable` (ANU-Net L1..L4): `prune(level)` returns a new network built pruned by the registry;
- `Gated`: attention gates whose first-layer coefficients can be recorded and saved;
- `ExtraLosses`: loss terms computed by the network itself, from its last training forward and the batch's
  mask (Fovea-UNet's nHSIC; auxiliary outputs trained against targets derived from the mask);
- `EpochScheduled`: a training forward that changes with the epoch (EH-Former's easy / hard fusion weight);
  the engine tells it the epoch at each epoch's start;
- `KernelRegularised`: the conv kernels a Keras-style L2 acts on, with their factors (FocusNet);
- `NamedFeatureLayers`: the layers whose features the paper analyses, the defaults of `medseg analyze cka`
  (Fovea-UNet: its Ghost modules' intrinsic features).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models.blocks import AttentionGate, check_input_size
from medseg.weights import LoadReport


@dataclass(frozen=True)
class EncoderCard:
    """Where a network's pretrained encoder sits and which weight files fit it.

    `family` and `name` say whose layout the file has (e.g. timm res2net50d, smp resnext50_32x4d);
    `module` is the encoder's path inside the network; `first_conv` the key (in the encoder's own state
    dict) of the first convolution's kernel, adapted when `in_channels` differs from the file's;
    `rename` maps key prefixes of the file to the encoder's (for truncated or regrouped encoders);
    `normalize` is the input normalisation the pretrained weights expect."""

    family: str
    name: str
    module: str
    first_conv: str
    rename: tuple[tuple[str, str], ...] = ()
    normalize: str = "imagenet"

    @property
    def label(self) -> str:
        return f"{self.family} {self.name}"


@dataclass(frozen=True)
class NetworkCard:
    """A registered network's metadata: what `medseg models`, predict, benchmark and weight loading read."""

    paper: str  # authors, title, venue, year
    size_multiple: int  # H and W must be multiples of this (predict pads to it)
    default_size: int  # the paper's input size
    paper_num_classes: int = 1  # 1 = sigmoid binary head, 2 = two-class softmax (the paper's configuration)
    head: str = "head"  # module-name prefix of the output layer(s): may be re-initialised when fine-tuning
    encoder: EncoderCard | None = None  # the pretrained encoder slot, if the network has one
    # the pretrained initialisation the paper (or its authors' code) starts from; training without a local file
    # for it is said in the training header and config.yaml
    paper_weights: str | None = None
    # module-name prefixes a whole-network file from an earlier training stage lacks: they keep their init when
    # such a file is loaded, and the load report lists them (EH-Former's stage 2 from its stage-1 file)
    later_stage: tuple[str, ...] = ()
    # False: bf16 autocast + channels_last does not pay for this network on a CPU (measured), so
    # `train.precision: auto` keeps fp32 for it (medseg.engine.precision)
    fast_path: bool = True

    def with_encoder(self, encoder: EncoderCard | None) -> "NetworkCard":
        return replace(self, encoder=encoder)


@dataclass(frozen=True)
class NetworkSpec:
    """Everything `create_model` needs to rebuild a network: what a model folder's config.json stores."""

    name: str
    in_channels: int
    num_classes: int
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "in_channels": self.in_channels, "num_classes": self.num_classes,
                "kwargs": dict(self.options)}


class SegmentationNetwork(nn.Module):
    """Base class of every registered network (see the module docstring for the contract)."""

    groups: ClassVar[dict[str, tuple[str, ...]]] = {"encoder": ("encoder",)}  # group -> module-name prefixes
    rest_group: ClassVar[str] = "decoder"  # the group of every parameter no prefix claims

    _spec: NetworkSpec | None = None
    _card: NetworkCard | None = None
    # What every load from a local file did (`medseg.models.pretrained`: encoder_weights, a recipe's
    # model.weights), in order: the trainer prints each `report.summary()` and stores `report.to_dict()`.
    load_reports: list[LoadReport]

    @classmethod
    def encoder_card(cls, card: NetworkCard, options: dict[str, Any]) -> EncoderCard | None:
        """The pretrained encoder slot of the variant built with `options` (every constructor argument, the
        defaults included): the card's. A network whose encoder is an option picks the slot from a table."""
        return card.encoder

    def bind(self, spec: NetworkSpec, card: NetworkCard) -> None:
        """Called once by `create_model`: record how the network was built and check input sizes from now on."""
        if self._spec is not None:
            raise RuntimeError(f"{type(self).__name__} is already bound to {self._spec.name!r}")
        self._spec, self._card = spec, card
        self.load_reports = []
        self.register_forward_pre_hook(_check_input, with_kwargs=True)

    @property
    def spec(self) -> NetworkSpec:
        if self._spec is None:
            raise RuntimeError(f"{type(self).__name__} was not built by medseg.create_model; build it there")
        return self._spec

    @property
    def card(self) -> NetworkCard:
        if self._card is None:
            raise RuntimeError(f"{type(self).__name__} was not built by medseg.create_model; build it there")
        return self._card

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{group: parameters}: each parameter in the first group whose prefix names it, else in `rest_group`."""
        named: dict[str, list[nn.Parameter]] = {group: [] for group in (*self.groups, self.rest_group)}
        for name, parameter in self.named_parameters():
            group = next((g for g, prefixes in self.groups.items()
                          if any(name == p or name.startswith(p + ".") for p in prefixes)), self.rest_group)
            named[group].append(parameter)
        return named


def _check_input(module: SegmentationNetwork, args: tuple, kwargs: dict) -> None:
    images = args[0] if args else kwargs.get("x")
    if isinstance(images, torch.Tensor):
        check_input_size(images, module.card.size_multiple)


class Prunable(ABC):
    """A deeply supervised network that can be cut to a shallower output (ANU-Net L_N, Sec. 3.5).

    `prune(level)` returns a NEW network, built by the registry with `pruned_options(level)` and given the
    weights it keeps, so its spec and its saved config.json are right by construction."""

    levels: ClassVar[tuple[int, ...]] = ()

    @abstractmethod
    def pruned_options(self, level: int) -> dict[str, Any]:
        """The options that build this network pruned to `level` (refuse a level it cannot reach)."""

    def prune(self, level: int) -> SegmentationNetwork:
        from medseg.models.registry import create_model

        network: SegmentationNetwork = self  # type: ignore[assignment]
        spec = network.spec
        options = {k: v for k, v in spec.options.items() if k != "encoder_weights"}
        options.update(self.pruned_options(level))
        pruned = create_model(spec.name, spec.in_channels, spec.num_classes, **options)
        kept = network.state_dict()
        missing = [k for k in pruned.state_dict() if k not in kept]
        if missing:
            raise MedsegError(f"cannot prune {spec.name!r} to level {level}: the network lacks {missing[:3]}")
        pruned.load_state_dict({k: kept[k] for k in pruned.state_dict()})
        return pruned.train(network.training)


class Gated(ABC):
    """A network with attention gates: `record_attention(True)` makes the gates remember their coefficients;
    `attention_maps()` returns those of the gates the network names as its first layer."""

    @abstractmethod
    def first_layer_gates(self) -> dict[str, AttentionGate]:
        """{name: gate} of the gates on the skips into the output level (empty when built without gates)."""

    def record_attention(self, enabled: bool = True) -> None:
        for module in self.modules():  # type: ignore[attr-defined]
            if isinstance(module, AttentionGate):
                module.keep_coefficients = enabled
                module.last_coefficients = None

    def attention_maps(self) -> dict[str, torch.Tensor]:
        """{name: (B, 1, H, W) coefficients in [0, 1]} from the last forward pass."""
        return {name: gate.last_coefficients for name, gate in self.first_layer_gates().items()
                if gate.last_coefficients is not None}


class ExtraLosses(ABC):
    """A network that computes loss terms of its own from the training forward: a feature regulariser, or an
    auxiliary output (an edge map, a vector field) scored against a target it derives from the mask. The
    recipe's `train.extra_loss_weights` weighs each by name.

    An auxiliary output reaches `extra_losses` through `keep_for_losses` (in the forward) and `take_kept` (in
    extra_losses): kept by a training forward only, scored once, so no graph outlives its step and a stale output
    is never scored."""

    kept_for_losses: Any = None  # what the last training forward kept for extra_losses

    def keep_for_losses(self, outputs: Any) -> None:
        """Keep `outputs` of a training forward for `extra_losses`; an eval forward (give None) keeps nothing."""
        self.kept_for_losses = outputs if self.training else None  # type: ignore[attr-defined]

    def take_kept(self) -> Any:
        """What the last training forward kept, released; refused when there was none since the last call."""
        kept, self.kept_for_losses = self.kept_for_losses, None
        if kept is None:
            raise MedsegError(f"{type(self).__name__}.extra_losses needs the outputs of a training forward; there "
                              "was none since the last call")
        return kept

    @abstractmethod
    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: scalar} from the last training forward and that batch's mask (N, H, W labels); the engine
        adds each with the recipe's weight."""


class EpochScheduled(ABC):
    """A network whose training depends on how far training has come (EH-Former's D-Fusion weight). The engine
    calls `set_training_progress` at the start of every training epoch; what it sets must live in the network's
    state (a buffer), so a saved model evaluates with the value of its epoch."""

    @abstractmethod
    def set_training_progress(self, epoch: int, epochs: int) -> None:
        """`epoch`: the 0-based epoch about to train; `epochs`: the recipe's `train.epochs`."""


class KernelRegularised(ABC):
    """A network that names the conv kernels a Keras-style L2 (`optim.kernel_l2`) acts on, with factors;
    without this capability the L2 covers every conv kernel with factor 1."""

    @abstractmethod
    def regularised_kernels(self) -> list[tuple[nn.Parameter, float]]:
        """[(kernel, factor)]: the L2 term is optim.kernel_l2 * sum(factor * kernel^2)."""


class NamedFeatureLayers(ABC):
    """A network that names the layers whose features its paper analyses (e.g. Fovea-UNet Fig. 5's intrinsic
    features); `medseg analyze cka` takes the first by default. Any other network needs `--layer`."""

    @abstractmethod
    def analysis_layers(self) -> list[str]:
        """Module names (as `named_modules` gives them) of conv layers with (B, C, H, W) outputs, in forward
        order; empty when this build of the network has none (then `--layer` is required)."""
