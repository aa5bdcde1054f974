"""Pretrained initialisation of registered networks from local files, through `medseg.weights.load_weights`.

- `load_encoder_weights(model, path)`: what `create_model(name, ..., encoder_weights=PATH)` calls. The
  network's `card.encoder` (an `EncoderCard`, chosen for the built variant by the class's `encoder_card`)
  says where the encoder sits (`model.get_submodule(card.module)`), whose key layout the file has
  (`rename`), which kernel is the first conv and what to call it in messages (`label`).
- `load_network_weights(model, path)`: a whole-network file (a recipe's `model.weights`, e.g. another run's
  model.safetensors or its checkpoints/best.ckpt) for fine-tuning; the head (`card.head`) stays at random
  init when its shape differs (another number of classes) and the encoder's first conv is adapted to another
  number of input channels.

Both follow the one rule of `medseg.weights` (every tensor of the target from the file, or a one-line
error naming the file and the tensor; the first conv adapted with timm's `adapt_input_conv`, as smp's
`patch_first_conv` adapts its pretrained encoders), append their `LoadReport` to `model.load_reports` and
return it. The trainer prints `report.summary()` and stores `report.to_dict()` with the run.

`smp_encoder_card(name, module)` is the table of segmentation_models_pytorch encoders: their files have
torchvision's layout (smp's encoders subclass torchvision's models; the classifier is unused), except
efficientnet-b0 (lukemelas efficientnet_pytorch), dpn68 (Cadene pretrainedmodels) and mit_b5 (NVlabs SegFormer's).
"""

from __future__ import annotations

from pathlib import Path

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, SegmentationNetwork
from medseg.weights import LoadReport, load_weights

CHECKPOINT_PREFIX = "model."  # SegmentationModule's attribute for the network in Lightning checkpoints
SMP_FIRST_CONV = {  # smp encoder name -> the key of its first convolution's kernel in the encoder's state dict
    "resnet50": "conv1.weight",
    "resnext50_32x4d": "conv1.weight",
    "mobilenet_v2": "features.0.0.weight",
    "efficientnet-b0": "_conv_stem.weight",
    "dpn68": "features.conv1_1.conv.weight",
    "vgg16": "features.0.weight",
    "mit_b5": "patch_embed1.proj.weight",
}


def smp_encoder_card(name: str, module: str) -> EncoderCard:
    """The encoder slot of an smp encoder `name` that sits at `module` inside a network."""
    if name not in SMP_FIRST_CONV:
        raise MedsegError(f"no pretrained-weights entry for the smp encoder {name!r}; "
                          f"known: {', '.join(SMP_FIRST_CONV)}")
    return EncoderCard(family="smp", name=name, module=module, first_conv=SMP_FIRST_CONV[name])


def load_encoder_weights(model: SegmentationNetwork, path: str | Path) -> LoadReport:
    """Initialise the network's pretrained encoder slot from a local file (see the module docstring)."""
    card = model.card.encoder
    if card is None:
        raise MedsegError(f"model {model.spec.name!r} has no pretrained encoder slot, so encoder_weights cannot apply")
    report = load_weights(model.get_submodule(card.module), path, what=card.label, first_conv=card.first_conv,
                          rename=card.rename)
    model.load_reports.append(report)
    return report


def load_network_weights(model: SegmentationNetwork, path: str | Path) -> LoadReport:
    """Initialise a whole network from a local file of the same network; only the head (and the parts a later
    training stage adds, `card.later_stage`) may stay random."""
    encoder = model.card.encoder
    first_conv = f"{encoder.module}.{encoder.first_conv}" if encoder is not None else None
    # a run's Lightning checkpoint (last.ckpt / best.ckpt) holds the network under "model."
    report = load_weights(model, path, what=f"network {model.spec.name}", first_conv=first_conv,
                          rename=((CHECKPOINT_PREFIX, ""),), reinit=(model.card.head, *model.card.later_stage))
    model.load_reports.append(report)
    return report
