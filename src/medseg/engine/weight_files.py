"""`medseg weights list` and `medseg weights inspect`: which local file each pretrained slot takes, and what a
file on disk holds and fits.

The papers start from ImageNet weights (M2SNet/MSNet: Res2Net-50-v1b, as the authors' code loads it; Fovea-UNet:
GhostNet, paper "Experiment settings"; M2SNet's LossNet: VGG-16, paper Sec. 3.2). medseg downloads nothing, so a
user brings each file from a machine with internet. The slots are read from the registry (every network's
encoder slot, for every value of an `encoder` option) plus LossNet's VGG-16; `SAVE_LINES` gives, per weight
family, the one Python line that writes the file in the layout the slot reads (timm, smp, torchvision).

`inspect_file` matches a file against every slot by name and shape with `medseg.weights.plan_weights` (the
rule `load_weights` applies, so "full match" means that loading will succeed), without building any
network's weights: the targets are built on the meta device. A file inside a model folder or a run (beside
config.json / config.yaml) is also matched against the network it was saved from.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medseg.models import create_model, list_models, model_info
from medseg.models.base import EncoderCard
from medseg.models.fovea_unet import GHOST_LAYOUTS, SWAPPED_ENCODERS
from medseg.models.pretrained import CHECKPOINT_PREFIX
from medseg.models.stsnet import ENCODERS as STSNET_ENCODERS
from medseg.weights import plan_weights, read_weights_file, shapes

# Networks whose `encoder` option swaps the pretrained slot: every value a user may give.
ENCODER_CHOICES = {"stsnet": STSNET_ENCODERS, "fovea_unet": (*GHOST_LAYOUTS, *SWAPPED_ENCODERS)}
# Options a variant needs to build besides the encoder (Fovea-UNet's nHSIC is defined on Ghost modules only).
VARIANT_NEEDS = {"fovea_unet": lambda encoder: {} if encoder in GHOST_LAYOUTS else {"nhsic": False}}
SAVE_LINES = {
    "timm": "import timm, torch; torch.save(timm.create_model('{name}', pretrained=True).state_dict(), '{name}.pth')",
    "smp": ("import segmentation_models_pytorch as smp, torch; "
            "torch.save(smp.encoders.get_encoder('{name}', weights='imagenet').state_dict(), '{name}.pth')"),
    "torchvision": ("import torchvision, torch; torch.save(torchvision.models.{name}(weights='IMAGENET1K_V1')"
                    ".state_dict(), '{name}.pth')"),
}
LOSSNET = "lossnet"


@dataclass(frozen=True)
class Slot:
    """One file layout medseg reads: `card` (family, name, where it goes), the (network, options) variants that
    take it (none for LossNet's VGG), the recipe key that names the file, and the line that saves it."""

    card: EncoderCard
    takers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    key: str

    @property
    def used_by(self) -> tuple[str, ...]:
        """The variants as a user writes them, e.g. "stsnet encoder=resnet50"."""
        if not self.takers:
            return (LOSSNET,)
        return tuple(" ".join([name, *(f"{k}={v}" for k, v in options)]) for name, options in self.takers)

    @property
    def save_line(self) -> str:
        return f'python -c "{SAVE_LINES[self.card.family].format(name=self.card.name)}"'


def variants(name: str) -> list[dict[str, Any]]:
    choices = ENCODER_CHOICES.get(name)
    return [{"encoder": encoder} for encoder in choices] if choices else [{}]


def weight_slots() -> list[Slot]:
    """Every pretrained slot, in registry order: the networks' encoders, then LossNet's VGG-16."""
    from medseg.losses.m2snet import VGG_SLICES

    found: dict[str, tuple[EncoderCard, list]] = {}
    for name in list_models():
        info = model_info(name)
        for options in variants(name):
            card = info.encoder_card(options)
            if card is not None:
                found.setdefault(card.label, (card, []))[1].append((name, tuple(options.items())))
    slots = [Slot(card, tuple(takers), "model.encoder_weights") for card, takers in found.values()]
    vgg = EncoderCard(family="torchvision", name="vgg16", module=f"features[:{VGG_SLICES[-1][1]}]",
                      first_conv="0.weight", rename=(("features.", ""),))
    return [*slots, Slot(vgg, (), "loss.N.vgg_weights (the lossnet term)")]


def slot_shapes(slot: Slot) -> dict[str, tuple[int, ...]]:
    """The tensor shapes the slot's target holds, built on the meta device (no memory, no initialisation)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LossNet's "random VGG" warning: nothing is trained here
        if not slot.takers:
            from medseg.losses import create_loss

            return shapes(create_loss(LOSSNET).vgg.state_dict())
        name, options = slot.takers[0]
        options = dict(options)
        model = create_model(name, 3, model_info(name).paper_num_classes, **options,
                             **VARIANT_NEEDS.get(name, lambda _: {})(options.get("encoder")))
        return shapes(model.get_submodule(slot.card.module).state_dict())


def saved_network(path: Path) -> tuple[str, Any] | None:
    """(where the spec came from, the network built on the meta device) for a file inside a model folder
    (config.json beside it) or a run (RUN/config.yaml above checkpoints/); None otherwise."""
    from medseg.models.saving import CONFIG_NAME, read_model_config, saved_options

    folder = path.parent
    spec = None
    if (folder / CONFIG_NAME).is_file():
        config = read_model_config(folder)
        spec, source = (config["name"], config["in_channels"], config["num_classes"], saved_options(config)), folder
    elif folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        from medseg.engine.run import Run

        model = Run(folder.parent).recipe().model
        spec = (model.name, model.in_channels, model.num_classes, model.options())
        source = folder.parent / "config.yaml"
    if spec is None:
        return None
    name, in_channels, num_classes, options = spec
    with torch.device("meta"):
        network = create_model(name, in_channels, num_classes, **options)
    return str(source), network


def inspect_file(path: str | Path) -> dict[str, Any]:
    """What a local weights file holds and which medseg slots or networks it fits (see the module docstring)."""
    path = Path(path)
    state, kind = read_weights_file(path)
    file = shapes(state)
    prefixes = dict(Counter(key.split(".", 1)[0] for key in state))
    matches = []
    for slot in weight_slots():
        own = slot_shapes(slot)
        plan = plan_weights(own, file, first_conv=slot.card.first_conv, rename=slot.card.rename)
        matches.append(_match(slot.card.label, list(slot.used_by), slot.key, own, plan))
    saved = saved_network(path)
    if saved is not None:
        source, network = saved
        own = shapes(network.state_dict())
        plan = plan_weights(own, file, rename=((CHECKPOINT_PREFIX, ""),))
        matches.append(_match(f"network {network.spec.name} (from {source})", [network.spec.name], "model.weights",
                              own, plan))
    return {"file": str(path), "format": kind, "tensors": len(state),
            "parameters": sum(t.numel() for t in state.values() if t.is_floating_point()),
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}),
            "prefixes": prefixes, "matches": matches}


def _match(label: str, used_by: list[str], key: str, own: dict, plan: Any) -> dict[str, Any]:
    status = "full" if not plan.problems and plan.source else "partial" if plan.source else "none"
    first = plan.problems[0] if plan.problems else None
    return {"slot": label, "used_by": used_by, "key": key, "status": status, "matched": len(plan.source),
            "needed": len(own) - len(plan.missing_buffers), "unused": len(plan.unused),
            "first_problem": None if first is None else
            f"{first[0]}: {'absent' if first[1] is None else f'of shape {first[1]}'} in the file, needs {first[2]}"}
