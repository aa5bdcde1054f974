"""FCN-8s (Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015;
PAMI 2017), the FCN row of FocusNet's Table 2 (ISBI 2019, from Li & Shen 2017), pinned down from the paper (Sec. 3-4,
Fig. 3) and the authors' reference net (shelhamer/fcn.berkeleyvision.org: voc-fcn8s/net.py, surgery.py).

- Encoder: VGG-16 (timm `vgg16`, the torchvision layout) with its classifier as convolutions, fc6 = 7x7 conv
  512 -> 4096 without padding and fc7 = 1x1 conv 4096 -> 4096 (timm's `pre_logits`), each followed by ReLU and
  dropout 0.5 (net.py drop6, drop7). conv1_1 pads by 100 and every max pool rounds up (Caffe), as in net.py, so any
  input size gives a score map that covers it.
- Skip architecture (paper Sec. 4.2, Fig. 3): 1x1 class scores on fc7 (score_fr), on pool4 and on pool3; score_fr
  upsampled x2 and added to the cropped pool4 scores, that sum upsampled x2 and added to the cropped pool3 scores,
  then upsampled x8 and cropped to the input. Crops at the offsets Caffe's coord_map gives (5, 9, 31).
- Upsampling (net.py: Deconvolution without bias, lr_mult 0; surgery.interp): fixed per-class bilinear kernels of
  4, 4 and 16 px; they never train, so they are non-persistent buffers here, not parameters.
- Score layers start at zero (paper Sec. 4.2: "We initialize the class scoring layer to zero").
- `encoder_weights: PATH` loads a local timm `vgg16` file (e.g. vgg16.tv_in1k, whose classifier timm stores as
  these convs) into the encoder; the paper starts from ImageNet VGG-16.

Parameters, 3 in, 21 classes (PASCAL VOC): 134,362,751 = VGG-16 with fc6/fc7 as convs 134,260,544 + three score
layers; the paper's Table 1 gives "134M" for FCN-VGG16. The reference Caffe net also stores its three upsampling
kernels (C x C x k x k each, 127,008 values at 21 classes) as (frozen) parameters; with them it is 134,489,759.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

CAFFE_INPUT_PAD = 100  # net.py conv1_1 pad=100
POOL4_CROP, POOL3_CROP, OUTPUT_CROP = 5, 9, 31  # Caffe coord_map offsets of voc-fcn8s
DROPOUT = 0.5


def bilinear_kernel(size: int) -> torch.Tensor:
    """The (size x size) bilinear interpolation kernel of surgery.upsample_filt."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - (torch.arange(size, dtype=torch.float32) - center).abs() / factor
    return ramp[:, None] * ramp[None, :]


class FixedBilinearUpsampling(nn.Module):
    """Caffe's Deconvolution with a fixed bilinear kernel on each class's own channel (stride `factor`)."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.channels, self.factor = channels, factor
        kernel = bilinear_kernel(2 * factor).expand(channels, 1, -1, -1).clone()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.kernel.to(x.dtype), stride=self.factor, groups=self.channels)


def crop_like(x: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    height, width = like.shape[-2:]
    return x[..., offset:offset + height, offset:offset + width]


def zero_conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


ENCODER = "vgg16"
CARD = NetworkCard(
    paper="Long, Shelhamer & Darrell, Fully Convolutional Networks for Semantic Segmentation (FCN-8s), CVPR 2015",
    size_multiple=1, default_size=500, paper_num_classes=21, head="score",
    encoder=EncoderCard(family="timm", name=ENCODER, module="encoder", first_conv="features.0.weight"),
    paper_weights="ImageNet VGG-16 (the reference net fine-tunes from it, through FCN-32s and FCN-16s)",
    # torch 2.14.1 on a CPU: the backward of the 4096 -> C score conv under bf16 autocast + channels_last corrupts
    # the heap ("free(): invalid next size", measured); `precision: auto` keeps fp32 for this network
    fast_path=False)


@register_model("fcn8s", CARD)
class FCN8s(SegmentationNetwork):
    """FCN-8s: VGG-16 made fully convolutional, class scores from fc7, pool4 and pool3 fused by bilinear upsampling."""

    def __init__(self, in_channels: int = 3, num_classes: int = 21):
        super().__init__()
        self.encoder = timm.create_model(ENCODER, pretrained=False, num_classes=0, in_chans=in_channels,
                                         drop_rate=DROPOUT)
        self.encoder.features[0].padding = (CAFFE_INPUT_PAD, CAFFE_INPUT_PAD)
        pools = [i for i, layer in enumerate(self.encoder.features) if isinstance(layer, nn.MaxPool2d)]
        for i in pools:
            self.encoder.features[i].ceil_mode = True  # Caffe's pooling rounds the output size up
        self.pool3_end, self.pool4_end = pools[2] + 1, pools[3] + 1
        self.drop7 = nn.Dropout(DROPOUT)  # timm's pre_logits drops after fc6 only
        self.score = nn.ModuleDict({"fr": zero_conv1x1(4096, num_classes), "pool4": zero_conv1x1(512, num_classes),
                                    "pool3": zero_conv1x1(256, num_classes)})
        self.up2 = FixedBilinearUpsampling(num_classes, 2)
        self.up2_pool4 = FixedBilinearUpsampling(num_classes, 2)
        self.up8 = FixedBilinearUpsampling(num_classes, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder.features
        pool3 = features[:self.pool3_end](x)
        pool4 = features[self.pool3_end:self.pool4_end](pool3)
        mlp = self.encoder.pre_logits  # fc6 (7x7, no padding) - ReLU - dropout - fc7 (1x1) - ReLU
        fc7 = mlp.act2(mlp.fc2(mlp.drop(mlp.act1(mlp.fc1(features[self.pool4_end:](pool4))))))
        scores = self.up2(self.score["fr"](self.drop7(fc7)))
        scores = self.up2_pool4(scores + crop_like(self.score["pool4"](pool4), POOL4_CROP, scores))
        scores = scores + crop_like(self.score["pool3"](pool3), POOL3_CROP, scores)
        return crop_like(self.up8(scores), OUTPUT_CROP, x)
