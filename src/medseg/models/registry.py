"""The one model registry: `@register_model(name)` on a network class, `create_model(name, ...)` to build.

Modelled on timm's decorator registry. A network class carries its own metadata as class attributes
(`paper`, `size_multiple`, `default_size`; first docstring line = description), so the table of
`medseg models` and the predict/benchmark code read one source. One class may be registered under
several names with different fixed options (e.g. a plain and an attention variant).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from medseg.errors import MedsegError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    cls: type[nn.Module]
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def paper(self) -> str:
        return self.cls.paper

    @property
    def size_multiple(self) -> int:
        return self.cls.size_multiple

    @property
    def default_size(self) -> int:
        return self.cls.default_size

    @property
    def paper_num_classes(self) -> int:
        """Output channels of the paper's configuration (1 = sigmoid binary head, 2 = two-class softmax)."""
        return getattr(self.cls, "paper_num_classes", 1)

    @property
    def description(self) -> str:
        return (inspect.getdoc(self.cls) or "").splitlines()[0]


_REGISTRY: dict[str, ModelInfo] = {}
_REQUIRED = ("paper", "size_multiple", "default_size")


def register_model(name: str, **fixed: Any):
    """Class decorator: register `cls(in_channels, num_classes, **kwargs)` under `name` with `fixed` options."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        missing = [attr for attr in _REQUIRED if not hasattr(cls, attr)]
        if missing:
            raise TypeError(f"{cls.__name__} must define class attributes {missing} to be registered")
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name, cls, dict(fixed))
        return cls

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise MedsegError(f"unknown model {name!r}; registered models: {', '.join(list_models())} (see `medseg models`)")
    return _REGISTRY[name]


def create_model(name: str, in_channels: int = 3, num_classes: int = 1, **kwargs: Any) -> nn.Module:
    """Build a registered network with random initialisation; nothing is downloaded."""
    info = model_info(name)
    if in_channels < 1 or num_classes < 1:
        raise MedsegError(f"model {name!r}: in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    clash = sorted(set(kwargs) & set(info.fixed))
    if clash:
        raise MedsegError(f"model {name!r} fixes {clash}; choose another registered name instead of overriding them")
    accepted = inspect.signature(info.cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        options = sorted(k for k in accepted if k not in ("self", "in_channels", "num_classes", *info.fixed))
        raise MedsegError(f"model {name!r} has no option {', '.join(unknown)}; its options are: {', '.join(options) or 'none'}")
    model = info.cls(in_channels=in_channels, num_classes=num_classes, **info.fixed, **kwargs)
    # What load_model needs to rebuild this exact network.
    model.medseg_config = {"name": name, "in_channels": in_channels, "num_classes": num_classes, "kwargs": dict(kwargs)}
    return model
