"""M2SNet's losses (Zhao et al., arXiv:2303.10894, Sec. 3.2, Eq. 4-6, and the authors' code: train.py,
model/miccai_msnet.py): `structure` and `lossnet`.

`structure` = weighted IoU + weighted BCE (the PraNet / F3Net "structure loss"). Boundary weights
w = 1 + 5 |AvgPool_31x31(G) - G| (stride 1, padding 15, zero padding counted). Per image, with p = sigmoid:
wIoU = 1 - (sum(w p G) + 1) / (sum(w (p + G)) - sum(w p G) + 1); mean over the batch.
`wbce: reference` (default) is what the released code computes: its `reduce='none'` is PyTorch's legacy
argument and means reduction='mean', so the BCE is a plain pixel mean and the weights have no effect;
`wbce: weighted` is the intended sum(w BCE) / sum(w) per image.

`lossnet` = the training-free perceptual loss: p and G are repeated to 3 channels, ImageNet-normalised,
resized (bilinear) to 224x224 and passed through a frozen VGG-16 `features` (torchvision layout) cut at
relu1_2 / relu2_2 / relu3_3 / relu4_3; the loss is the sum of the four feature MSEs. The recipe gives it
weight 0.1 (the code's value; the paper's Eq. 4 is unweighted). The VGG is kept in eval mode, takes no
gradient, and is deliberately not a registered submodule: it never enters a state dict, a checkpoint or
model.safetensors. Its weights come from a local file (`vgg_weights`: a torchvision vgg16 state dict, the
whole model's or its `features`'), loaded by `medseg.weights.load_weights` with the one rule of every medseg
weight file: all 23 layers' tensors must be there (the `features.` prefix is renamed away; the deeper
layers and the classifier are unused), else a one-line error names the file and the tensor. Without a file
the VGG is randomly initialised (seeded) and a warning says so, because the loss is then only a
random-feature loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg16

from medseg.errors import MedsegError
from medseg.losses.basic import binary_target
from medseg.losses.registry import register_loss
from medseg.weights import LoadReport, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23))  # relu1_2, relu2_2, relu3_3, relu4_3
LOSSNET_SIZE = 224
VGG_LABEL = f"torchvision vgg16 features[:{VGG_SLICES[-1][1]}]"


def boundary_weights(truth: torch.Tensor) -> torch.Tensor:
    """1 + 5 |local mean (31x31) - G|: large near the object's edges."""
    return 1 + 5 * (F.avg_pool2d(truth, 31, stride=1, padding=15) - truth).abs()


@register_loss("structure")
class StructureLoss(nn.Module):
    def __init__(self, wbce: Literal["reference", "weighted"] = "reference"):
        super().__init__()
        if wbce not in ("reference", "weighted"):
            raise MedsegError(f"structure loss: wbce must be 'reference' or 'weighted', got {wbce!r}")
        self.wbce = wbce

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        truth = binary_target("structure", logits, target)
        weights = boundary_weights(truth)
        if self.wbce == "reference":
            bce = F.binary_cross_entropy_with_logits(logits, truth)
        else:
            per_pixel = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
            bce = ((weights * per_pixel).sum((2, 3)) / weights.sum((2, 3))).mean()
        probs = torch.sigmoid(logits)
        inter = (weights * probs * truth).sum((2, 3))
        union = (weights * (probs + truth)).sum((2, 3))
        wiou = 1 - (inter + 1) / (union - inter + 1)
        return bce + wiou.mean()


@register_loss("lossnet")
class LossNet(nn.Module):
    def __init__(self, vgg_weights: str | None = None):
        super().__init__()
        features = vgg16(weights=None).features[: VGG_SLICES[-1][1]]
        self.load_report: LoadReport | None = None
        if vgg_weights:
            self.load_report = load_weights(features, Path(vgg_weights), what=VGG_LABEL, rename=(("features.", ""),))
        else:
            warnings.warn("lossnet: no vgg_weights given, so VGG-16 is randomly initialised and LossNet is only a "
                          "random-feature loss; give a local torchvision vgg16 file with loss.N.vgg_weights",
                          stacklevel=2)
        features.eval().requires_grad_(False)
        # A plain attribute, not a submodule: the frozen VGG stays out of every state dict.
        self.__dict__["vgg"] = features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _features(self, maps: torch.Tensor) -> list[torch.Tensor]:
        x = (maps.repeat(1, 3, 1, 1) - self.mean) / self.std
        x = F.interpolate(x, size=(LOSSNET_SIZE, LOSSNET_SIZE), mode="bilinear", align_corners=False)
        out = []
        for start, end in VGG_SLICES:
            x = self.vgg[start:end](x)
            out.append(x)
        return out

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        truth = binary_target("lossnet", logits, target)
        if next(self.vgg.parameters()).device != logits.device:
            self.vgg.to(logits.device)
        self.vgg.eval()
        with torch.no_grad():
            reference = self._features(truth.float())
        predicted = self._features(torch.sigmoid(logits).float())
        return sum(F.mse_loss(p, r) for p, r in zip(predicted, reference))
