"""M2SNet's losses (arXiv:2303.10894, Sec. 3.2, Eq. 4-6, and the authors' code: train.py,
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

Multi-class outputs (C >= 2 channels, softmax over the classes including background; GOALS' three retinal layers,
paper Sec. 4.1 and Tab. 5, whose loss the paper does not describe beyond Eq. 4 for every task) - ours, the
per-class form of the binary losses, chosen so that two classes with logits [0, x] give exactly the binary loss of
logit x (softmax([0, x])[1] = sigmoid(x)):
- `structure`: the BCE term becomes the softmax cross-entropy (`reference`: the pixel mean; `weighted`: weighted by
  the mean over the foreground classes of their boundary weights w_k = 1 + 5 |AvgPool(G_k) - G_k|), and wIoU is
  computed per foreground class k (probability p_k, one-hot G_k, weights w_k), then averaged over the classes 1..C-1
  and the batch. Background is left out of wIoU as it is of the Dice loss (`dice`, include_background false).
- `lossnet`: each foreground class's probability map p_k and one-hot mask G_k go through the VGG as one binary
  pair does; the MSE then averages over the batch and the classes 1..C-1.
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
from medseg.losses.basic import class_probabilities, label_target
from medseg.losses.registry import register_loss
from medseg.weights import LoadReport, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23))  # relu1_2, relu2_2, relu3_3, relu4_3
LOSSNET_SIZE = 224
VGG_LABEL = f"torchvision vgg16 features[:{VGG_SLICES[-1][1]}]"


def foreground_maps(name: str, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, masks) of the foreground classes, (B, K, H, W): the sigmoid map for one output channel,
    the softmax maps and one-hot masks of classes 1..C-1 for C >= 2."""
    probs, truth = class_probabilities(name, logits, target)
    return (probs, truth) if logits.shape[1] == 1 else (probs[:, 1:], truth[:, 1:])


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
        probs, truth = foreground_maps("structure", logits, target)  # (B, K, H, W): K = 1 binary, C - 1 multi-class
        weights = boundary_weights(truth)
        if logits.shape[1] == 1:
            per_pixel = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
        else:  # softmax cross-entropy: the binary BCE of logit x is the two-class CE of logits [0, x]
            per_pixel = F.cross_entropy(logits, label_target("structure", logits, target), reduction="none")[:, None]
        if self.wbce == "reference":
            bce = per_pixel.mean()
        else:
            pixel_weights = weights.mean(dim=1, keepdim=True)
            bce = ((pixel_weights * per_pixel).sum((2, 3)) / pixel_weights.sum((2, 3))).mean()
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
        probs, truth = foreground_maps("lossnet", logits, target)
        if next(self.vgg.parameters()).device != logits.device:
            self.vgg.to(logits.device)
        self.vgg.eval()
        # each class map is one single-channel image for the VGG: (B, K, H, W) -> (B K, 1, H, W)
        with torch.no_grad():
            reference = self._features(truth.float().flatten(0, 1)[:, None])
        predicted = self._features(probs.float().flatten(0, 1)[:, None])
        return sum(F.mse_loss(p, r) for p, r in zip(predicted, reference))
