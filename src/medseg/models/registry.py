"""The one model registry: `@register_model(name, card, **fixed)` on a network class, `create_model(name, ...)`
to build one.

Modelled on timm's decorator registry with its per-variant `pretrained_cfg`: each registered name carries a
`NetworkCard` (paper, size multiple, default size, head, pretrained encoder slot) that `medseg models`,
predict, benchmark and weight loading read; the class's first docstring line is its description. One class
may be registered under several names with different fixed options (e.g. a plain and an attention variant).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, NetworkSpec, SegmentationNetwork
from medseg.models.pretrained import load_encoder_weights

ENCODER_WEIGHTS = "encoder_weights"  # the option that initialises a network's encoder from a local file
NOT_OPTIONS = ("self", "in_channels", "num_classes")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    cls: type[SegmentationNetwork]
    card: NetworkCard
    fixed: dict[str, Any] = field(default_factory=dict)

    paper = property(lambda self: self.card.paper)
    size_multiple = property(lambda self: self.card.size_multiple)
    default_size = property(lambda self: self.card.default_size)
    paper_num_classes = property(lambda self: self.card.paper_num_classes)

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.cls) or "").splitlines()[0]

    def options(self) -> list[str]:
        """The options a user may set: constructor arguments besides the fixed ones, and `encoder_weights`
        when the network has a pretrained encoder slot."""
        accepted = [k for k in self._constructor_parameters() if k not in (*self.fixed, *NOT_OPTIONS)]
        return sorted([*accepted, ENCODER_WEIGHTS] if self.card.encoder is not None else accepted)

    def encoder_card(self, options: dict[str, Any]) -> EncoderCard | None:
        """The pretrained encoder slot of the variant that `options` (user options) build."""
        defaults = {k: p.default for k, p in self._constructor_parameters().items()
                    if p.default is not inspect.Parameter.empty}
        return self.cls.encoder_card(self.card, {**defaults, **self.fixed, **options})

    def _constructor_parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.cls.__init__).parameters)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, card: NetworkCard, **fixed: Any):
    """Class decorator: register `cls(in_channels, num_classes, **options)` under `name` with its card and
    `fixed` options."""

    def wrap(cls: type[SegmentationNetwork]) -> type[SegmentationNetwork]:
        if not issubclass(cls, SegmentationNetwork):
            raise TypeError(f"{cls.__name__} must subclass medseg.models.base.SegmentationNetwork to be registered")
        if not isinstance(card, NetworkCard):
            raise TypeError(f"register_model({name!r}) needs a NetworkCard")
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name, cls, card, dict(fixed))
        return cls

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise MedsegError(f"unknown model {name!r}; registered models: {', '.join(list_models())} "
                          "(see `medseg models`)")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int = 3, num_classes: int = 1, **options: Any) -> SegmentationNetwork:
    """Build a registered network with random initialisation (nothing is downloaded); `encoder_weights=PATH`
    then loads a local encoder file into its encoder slot (see `medseg.models.pretrained`; the report is in
    `model.load_reports`). The option stays in `model.spec.options`; a saved model folder leaves it out."""
    info = model_info(name)
    if in_channels < 1 or num_classes < 1:
        raise MedsegError(f"model {name!r}: in_channels and num_classes must be >= 1, "
                          f"got {in_channels} and {num_classes}")
    clash = sorted(set(options) & set(info.fixed))
    if clash:
        raise MedsegError(f"model {name!r} fixes {clash}; choose another registered name instead of overriding them")
    allowed = info.options()
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        raise MedsegError(f"model {name!r} has no option {', '.join(unknown)}; "
                          f"its options are: {', '.join(allowed) or 'none'}")
    built = {k: v for k, v in options.items() if k != ENCODER_WEIGHTS}
    model = info.cls(in_channels=in_channels, num_classes=num_classes, **info.fixed, **built)
    card = info.card.with_encoder(info.encoder_card(built))  # the encoder slot of this variant (e.g. `encoder=`)
    model.bind(NetworkSpec(name, in_channels, num_classes, dict(options)), card)
    if options.get(ENCODER_WEIGHTS):
        load_encoder_weights(model, options[ENCODER_WEIGHTS])
    return model
