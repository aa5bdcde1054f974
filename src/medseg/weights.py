"""Local weight files: the one place medseg turns a file on disk into tensors and loads them into a module.

`read_state_dict` reads a .safetensors file or a torch state dict (`weights_only=True`: no pickle code runs),
unwraps a checkpoint's `state_dict` entry and strips the `module.` prefix DistributedDataParallel adds.
Nothing is ever downloaded.

`load_weights` is the ONE loader for whole networks, pretrained encoders and LossNet's VGG-16, with one rule:

- the file's keys are renamed by prefix pairs (file prefix -> target prefix), then matched by name;
- EVERY tensor of the target must come from the file, with its shape. Two exceptions only: a
  `num_batches_tracked` buffer may be absent (BatchNorm's step counter: the target keeps its own), and
  tensors under a `reinit` prefix (a classification head fine-tuned to another number of classes) stay at
  random init when absent or of another shape; both are reported;
- the `first_conv` kernel is adapted when only its input-channel dimension differs (a 3-channel ImageNet
  file for a 1-channel CT network), with timm's `adapt_input_conv`: 1 channel = the sum over the file's
  channels, n channels = the file's channels repeated cyclically and scaled by file/n. That is also what
  smp's `patch_first_conv` does to pretrained encoders, so the activations' scale is kept either way;
- tensors of the file that the target does not have are reported as unused (a classifier, deeper stages);
- anything else (a missing tensor, another shape) raises a one-line `MedsegError` that names the file,
  the target and the first offending tensor with both shapes: a partial or wrong file is never silently
  half-loaded, which a lenient `strict=False` load would do.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import MedsegError

OPTIONAL_BUFFERS = ("num_batches_tracked",)  # buffers a file may lack (the target keeps its own value)
DDP_PREFIX = "module."


def names_in_short(names: list[str], listed: int = 8) -> str:
    """Up to `listed` tensor names as they are; more as the count under each top-level module (a later training
    stage's whole parts, say), so the summary stays one readable line."""
    if len(names) <= listed:
        return ", ".join(names)
    counts = Counter(name.split(".", 1)[0] for name in names)
    return ", ".join(f"{count} under {top}" for top, count in counts.items())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local .safetensors file or a .pt/.pth state dict (read with weights_only: no pickle code)."""
    return read_weights_file(path)[0]


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, what kind of file held them): "safetensors", "state dict", "checkpoint" (a `state_dict` entry,
    e.g. Lightning's), each with ", DDP-wrapped" when every key carried DistributedDataParallel's prefix."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"weights file {path} does not exist; give a local .safetensors or .pth file "
                          "(nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state, kind = load_file(str(path)), "safetensors"
        except Exception as exc:  # noqa: BLE001  (any unreadable file is the user's input error)
            raise MedsegError(f"cannot read weights file {path}: {exc}") from None
    else:
        try:
            state, kind = torch.load(path, map_location="cpu", weights_only=True), "state dict"
        except Exception as exc:  # noqa: BLE001  (any unreadable file is the user's input error)
            raise MedsegError(f"cannot read weights file {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state, kind = state["state_dict"], "checkpoint"
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MedsegError(f"weights file {path} does not hold a state dict of tensors")
    if all(key.startswith(DDP_PREFIX) for key in state):
        state, kind = {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}, f"{kind}, DDP-wrapped"
    return state, kind


@dataclass
class LoadReport:
    """What `load_weights` did: `loaded` tensors (adapted ones included), the optional buffers the file
    lacked, the tensors left at random init under a `reinit` prefix, the file's unused tensors (file names)
    and the adapted first conv ({name: "3->1 channels"})."""

    file: str
    what: str
    loaded: int
    missing_buffers: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, for a run's config.yaml / JSON."""
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. 'loaded 265 tensors from F into timm res2net50d (first conv adapted 3->1 channels;
        2 unused)'."""
        notes = [f"first conv adapted {detail}" for detail in self.adapted.values()]
        if self.reinitialised:
            notes.append(f"{len(self.reinitialised)} re-initialised: {names_in_short(self.reinitialised)}")
        if self.missing_buffers:
            notes.append(f"{len(self.missing_buffers)} absent num_batches_tracked kept")
        if self.unused:
            notes.append(f"{len(self.unused)} unused")
        detail = f" ({'; '.join(notes)})" if notes else ""
        return f"loaded {self.loaded} tensors from {self.file} into {self.what}{detail}"


@dataclass
class WeightPlan:
    """How a file's tensors map onto a target by the module docstring's rule, from shapes alone (no tensor is
    read or written): `source` {target name: file name} of the matched tensors, `adapted` {target name: "3->1
    channels"}, the absent optional buffers, the re-initialised tensors, and `problems` [(target name, file
    shape or None when absent, target shape)]."""

    source: dict[str, str]
    adapted: dict[str, str]
    missing_buffers: list[str]
    reinitialised: list[str]
    problems: list[tuple[str, tuple[int, ...] | None, tuple[int, ...]]]
    unused: list[str]

    def refusal(self, path: str | Path, what: str, total: int) -> str | None:
        """The one-line reason the file does not fit, or None when it does."""
        if self.problems:
            name, found, wanted = self.problems[0]
            has = "absent" if found is None else f"of shape {found}"
            first = f"first {name!r}: {has} in the file, {what} needs {wanted}"
            if not self.source:
                return f"no tensor in {path} matches {what} by name and shape ({first}); is it the right file?"
            return (f"{path} does not fit {what}: {len(self.problems)} of {total} tensors missing or of another shape, "
                    f"{first}")
        if not self.source:
            return f"no tensor in {path} matches {what} by name and shape; is it the right file?"
        return None


def plan_weights(own: dict[str, tuple[int, ...]], file: dict[str, tuple[int, ...]], *, first_conv: str | None = None,
                 rename: Iterable[tuple[str, str]] = (), reinit: Iterable[str] = ()) -> WeightPlan:
    """Match a file's tensor shapes ({name: shape}) to a target's by the module docstring's rule."""
    rename, reinit = tuple(rename), tuple(reinit)
    source: dict[str, str] = {}  # target-side name -> file name
    for key in file:
        source.setdefault(_renamed(key, rename), key)
    plan = WeightPlan({}, {}, [], [], [], [])
    for name, shape in own.items():
        found = tuple(file[source[name]]) if name in source else None
        if found is not None and found == tuple(shape):
            plan.source[name] = source[name]
        elif found is not None and name == first_conv and _adaptable(found, tuple(shape)):
            plan.source[name] = source[name]
            plan.adapted[name] = f"{found[1]}->{shape[1]} channels"
        elif any(name == prefix or name.startswith(prefix + ".") for prefix in reinit):
            plan.reinitialised.append(name)
        elif found is None and name.rsplit(".", 1)[-1] in OPTIONAL_BUFFERS:
            plan.missing_buffers.append(name)
        else:
            plan.problems.append((name, found, tuple(shape)))
    used = set(plan.source.values())
    plan.unused = [key for key in file if key not in used]
    return plan


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def load_weights(target: nn.Module, path: str | Path, *, what: str, first_conv: str | None = None,
                 rename: Iterable[tuple[str, str]] = (), reinit: Iterable[str] = ()) -> LoadReport:
    """Load a local weights file into `target` by the module docstring's rule and return the report.

    `what` names the target in messages (e.g. "timm res2net50d"); `first_conv` is the key (in the target's
    state dict) of the kernel to adapt when the file has another number of input channels; `rename` holds
    (file prefix, target prefix) pairs, the first matching one applies; `reinit` holds target prefixes whose
    tensors may stay at random init. Raises `MedsegError` (one line) when the file does not fit."""
    state = read_state_dict(path)
    own = target.state_dict()
    plan = plan_weights(shapes(own), shapes(state), first_conv=first_conv, rename=rename, reinit=reinit)
    refusal = plan.refusal(path, what, len(own))
    if refusal:
        raise MedsegError(refusal)
    matched = {name: state[key] for name, key in plan.source.items()}
    if plan.adapted:
        from timm.models import adapt_input_conv

        for name in plan.adapted:
            matched[name] = adapt_input_conv(own[name].shape[1], matched[name], base_chans=matched[name].shape[1])
    # nn.Module's own method: an encoder may override it without `strict` (smp's MixVisionTransformerEncoder)
    nn.Module.load_state_dict(target, matched, strict=False)
    return LoadReport(file=str(path), what=what, loaded=len(matched), missing_buffers=plan.missing_buffers,
                      reinitialised=plan.reinitialised, unused=plan.unused, adapted=plan.adapted)


def _renamed(key: str, rename: tuple[tuple[str, str], ...]) -> str:
    for old, new in rename:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _adaptable(found: tuple[int, ...], wanted: tuple[int, ...]) -> bool:
    """A conv kernel's shape that differs from the target's in its input-channel dimension only."""
    return len(found) == len(wanted) == 4 and found[0] == wanted[0] and found[2:] == wanted[2:]
