"""DeepLabV3 with Across Feature Map Attention (Sang, Zhou, Islam & Xing, "Small-Object Sensitive Segmentation Using
Across Feature Map Attention", IEEE TPAMI 45(5), 6289-6306, 2023; Sec. 3, Fig. 2), the "DeepLabV3AFMA" baseline of
STS-Net's Table 1 (Sci. Rep. 2025, 39.15 M parameters), pinned down from the authors' code (ShengtianSang/AFMA:
models/attonimage/encoder_channelatt_img.py, models/deeplabv3/deeplabv3_model.py, models/deeplabv3/deeplabv3_decoder.py,
utils/losses.py, main.py), which is built on segmentation_models_pytorch 0.2.

- Segmentation network (code `My_DeepLabV3`): smp's DeepLabV3, the encoder at output stride 8 (stages 4 and 5
  dilated 2 and 4), ASPP with 256 channels and rates 12/24/36 (dropout 0.5 in the projection), a 3x3 conv-BN-ReLU,
  a 1x1 head and x8 bilinear upsampling: smp's `DeepLabV3` builds exactly this.
- Encoder: ResNeXt50-32x4d (smp `resnext50_32x4d`). The code asks for the encoder at run time (main.py offers
  resnet18..152; the class default is resnet34, 26 M); ResNeXt50-32x4d is the one smp encoder that gives STS-Net's
  39.15 M with AFMA (ResNet-50 gives 39.68 M) and the encoder of STS-Net itself.
  `encoder_weights: PATH` loads a local torchvision/smp resnext50_32x4d file (nothing is downloaded).
- AFMA (paper Sec. 3.1, Fig. 2a; code `Encoder_channelatt_img`): the image goes through a 7x7 conv to 64 channels
  and a 3x3 conv to one map per class; the encoder's feature at depth `att_depth` through a 1x1 conv to one map
  per class, divided by 4^att_depth. Both are cut into 10 x 10 patches (`PATCH`, code `patch_size=10`), each patch
  (100 values) goes through the same two bias-free linear layers (100 -> 200 -> 100) and a ReLU, and per class the
  attention between every image patch and every feature patch is their dot product / 100:
  (N, classes, image patches, feature patches). The code builds AFMA for 12 classes whatever the head has (its
  CamVid setting); medseg builds it for the head's classes, which its loss requires (ours).
- Output modification (paper Sec. 3.2, Fig. 2b; code `SegmentationHead.forward`): the decoder's logits are turned
  into one-hot argmax masks, average-pooled to the feature's resolution and cut into 10 x 10 patches; each image
  patch's correction is the AFMA row (divided by its count of non-zero entries) times those patches, folded back to
  the image; logits + correction * logits is the output (the code then applies log-softmax, which medseg's losses
  and metrics apply themselves). Pixels past the last whole patch get no correction, as in the code.
- Gold AFMA and its loss (paper Sec. 3.3, Fig. 2c; code `MyLoss_correction`): the one-hot mask at full resolution
  and average-pooled to the feature's resolution, patched the same way, their per-class patch dot products / 100;
  the MSE between AFMA and gold AFMA is `extra_losses(mask)["afma"]` (the code's loss: 5 x NLL + 1 x MSE).
- `att_depth` (code: asked at run time, -1..5; encoder depth 1..5): 2 by default (ours: the paper's choice for
  DeepLabV3 is not in the code). At depths 4 and 5 the features are at 1/8 (dilated), so the mask side pools by
  8, as the code's head and loss clamp the depth to 3 for DeepLabV3.

A one-channel (sigmoid) head gets AFMA for the foreground alone (ours; the code is softmax only): the predicted
mask is logit > 0, the gold mask the label's foreground; `sigmoid(z)` is the two-class softmax of (0, z).

Parameters (3 in, 2 classes, att_depth 2): 39,156,998 = smp DeepLabV3-ResNeXt50 39,105,858 + AFMA 51,140 (image
convs 9,472 + 1,154, feature conv 514, patch linears 40,000); STS-Net Table 1's "39.15" M (every att_depth gives
39.156-39.158 M). Inputs: multiples of 8 (output stride 8), at least 10 x 2^att_depth px (one feature patch).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import ExtraLosses, NetworkCard, SegmentationNetwork
from medseg.models.pretrained import smp_encoder_card
from medseg.models.registry import register_model

ENCODER = "resnext50_32x4d"
PATCH = 10  # code: patch_size=10
OUTPUT_STRIDE = 8  # code: make_dilated(stage_list=[4, 5], dilation_list=[2, 4])
IMAGE_WIDTH = 64  # code: conv_img's 7x7 conv to 64 channels
NONZERO_EPS = 1e-5  # code: count_nonzero(...) + 0.00001


def patches(x: torch.Tensor, size: int = PATCH) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, L, size^2): the non-overlapping size x size patches of each channel, row-major."""
    n, c = x.shape[:2]
    return F.unfold(x, size, stride=size).view(n, c, size * size, -1).transpose(-1, -2)


def fold_patches(x: torch.Tensor, image_size: tuple[int, int], size: int = PATCH) -> torch.Tensor:
    """The inverse of `patches`: (N, C, L, size^2) -> (N, C, H, W), zero past the last whole patch."""
    n, c, count, _ = x.shape
    return F.fold(x.transpose(-1, -2).reshape(n, c * size * size, count), image_size, size, stride=size)


def class_masks(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, H, W) labels -> (N, classes, H, W) float one-hot; for a one-channel head, the foreground alone."""
    if num_classes == 1:
        return (labels > 0).float().unsqueeze(1)
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()


def gold_afma(labels: torch.Tensor, num_classes: int, factor: int, size: int = PATCH) -> torch.Tensor:
    """The AFMA a perfect network would give (paper Fig. 2c): per class, the dot products of the one-hot mask's
    patches with the patches of that mask average-pooled by `factor`, / size^2. (N, classes, L_image, L_feature)."""
    mask = class_masks(labels, num_classes)
    pooled = F.avg_pool2d(mask, factor)  # code: a frozen all-ones conv with stride = kernel, / factor^2
    return patches(mask, size) @ patches(pooled, size).transpose(-1, -2) / (size * size)


def modify_output(logits: torch.Tensor, afma: torch.Tensor, factor: int, size: int = PATCH) -> torch.Tensor:
    """Output modification (paper Fig. 2b): logits + correction * logits, the correction carried from the argmax
    masks at the feature's resolution to the image's patches by the (row-normalised) AFMA."""
    channels = logits.shape[1]
    labels = logits.argmax(dim=1) if channels > 1 else logits[:, 0] > 0
    predicted = class_masks(labels, channels).to(logits.dtype)
    pooled = patches(F.avg_pool2d(predicted, factor), size)  # (N, C, L_feature, size^2)
    nonzero = (afma != 0).sum(dim=-1, keepdim=True) + NONZERO_EPS
    correction = fold_patches((afma / nonzero) @ pooled, tuple(logits.shape[-2:]), size)
    return logits + correction * logits


class AcrossFeatureMapAttention(nn.Module):
    """AFMA (paper Fig. 2a): per class, attention between the image's patches and one feature map's patches."""

    def __init__(self, in_channels: int, feature_channels: int, num_classes: int, depth: int, size: int = PATCH):
        super().__init__()
        self.size, self.feature_scale = size, 4 ** depth  # code: feamap / (2^d * 2^d)
        self.image_conv = nn.Sequential(nn.Conv2d(in_channels, IMAGE_WIDTH, 7, padding=3),
                                        nn.Conv2d(IMAGE_WIDTH, num_classes, 3, padding=1))
        self.feature_conv = nn.Conv2d(feature_channels, num_classes, 1)
        area = size * size
        self.resolution = nn.Sequential(nn.Linear(area, 2 * area, bias=False), nn.Linear(2 * area, area, bias=False),
                                        nn.ReLU())

    def forward(self, image: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        image_patches = self.resolution(patches(self.image_conv(image), self.size))
        feature_patches = self.resolution(patches(self.feature_conv(feature) / self.feature_scale, self.size))
        return image_patches @ feature_patches.transpose(-1, -2) / (self.size * self.size)


CARD = NetworkCard(
    paper="Sang, Zhou, Islam & Xing, Small-Object Sensitive Segmentation Using Across Feature Map Attention "
          "(DeepLabV3 + AFMA), IEEE TPAMI 2023",
    size_multiple=OUTPUT_STRIDE, default_size=512, paper_num_classes=2, head="network.segmentation_head",
    encoder=smp_encoder_card(ENCODER, "network.encoder"),
    paper_weights="an ImageNet encoder (the authors' code: encoder_weights='imagenet')")


@register_model("deeplabv3_afma", CARD)
class DeepLabV3AFMA(ExtraLosses, SegmentationNetwork):
    """DeepLabV3 (OS 8, ResNeXt50-32x4d) with Across Feature Map Attention correcting its output; AFMA loss extra."""

    groups = {"encoder": ("network.encoder",)}

    def __init__(self, in_channels: int = 3, num_classes: int = 2, att_depth: int = 2):
        super().__init__()
        if not 1 <= att_depth <= 5:
            raise MedsegError(f"att_depth is the encoder stage AFMA reads, 1..5; got {att_depth}")
        self.network = smp.DeepLabV3(encoder_name=ENCODER, encoder_weights=None, in_channels=in_channels,
                                     classes=num_classes, encoder_output_stride=OUTPUT_STRIDE, decoder_channels=256,
                                     decoder_atrous_rates=(12, 24, 36))
        self.att_depth, self.num_classes = att_depth, num_classes
        self.factor = 2 ** min(att_depth, 3)  # stages 4 and 5 are dilated: their features stay at 1/8
        self.afma = AcrossFeatureMapAttention(in_channels, self.network.encoder.out_channels[att_depth], num_classes,
                                              att_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        least = PATCH * self.factor
        if min(x.shape[-2:]) < least:
            raise ValueError(f"deeplabv3_afma with att_depth {self.att_depth} needs inputs of at least {least} px "
                             f"(one {PATCH} x {PATCH} patch of the 1/{self.factor} feature map), "
                             f"got {tuple(x.shape[-2:])}")
        features = self.network.encoder(x)
        logits = self.network.segmentation_head(self.network.decoder(features))
        afma = self.afma(x, features[self.att_depth])
        self.keep_for_losses(afma)
        return modify_output(logits, afma, self.factor)

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"afma": MSE between the last training forward's AFMA and the gold AFMA of `mask`} (code: MSELoss)."""
        afma = self.take_kept()
        gold = gold_afma(mask, self.num_classes, self.factor)
        return {"afma": F.mse_loss(afma.float(), gold)}
