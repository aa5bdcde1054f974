"""DoubleU-Net (Jha, Riegler, Johansen, Halvorsen & Johansen, "DoubleU-Net: A Deep Convolutional Neural Network for
Medical Image Segmentation", IEEE CBMS 2020, arXiv:2006.04868), a baseline of Fovea-UNet's Table 2.

Built from the paper (Sec. III, Fig. 1) and the authors' Keras code (DebeshJha/2020-CBMS-DoubleU-Net, `model.py`,
the code of the paper's experiments; their later `doubleunet_pytorch.py` differs in small ways, noted below):
- Network 1: the VGG-19 convolutions up to block5_conv4 (1/16; skips after block1_conv2, block2_conv2,
  block3_conv4, block4_conv4), ASPP, a decoder of four (bilinear x2 up, concat skip, conv block) steps with
  256, 128, 64, 32 channels, a 1x1 conv head -> output 1.
- The input multiplied by output 1's sigmoid feeds network 2: a U-Net encoder of four conv blocks (32, 64, 128,
  256, each then 2x2 max-pooling), ASPP, a decoder whose steps concatenate the skips of BOTH encoders, a 1x1 head
  -> output 2, the network's prediction.
- Conv block: two conv3x3 (bias) -> BN -> ReLU, then squeeze-and-excitation (ratio 8, no bias: Keras Dense
  use_bias=False; timm's SEModule).
- ASPP (64 filters): image pooling (global average, conv1x1 with bias, BN, ReLU, broadcast back), conv1x1 and
  conv3x3 with rates 6, 12, 18 (no bias, BN, ReLU), concatenated, conv1x1 (no bias) BN ReLU. The PyTorch port's
  2 x 2 adaptive pooling in the image branch is not the paper's code.
- Training mode returns [output 2, output 1] (the code trains both with the same loss on the concatenated masks,
  so the recipe's terms apply to both, weight 1 each); eval returns output 2.
Ours: Keras's bilinear UpSampling2D is half-pixel bilinear (align_corners=False). With more than one class the
input is multiplied by output 1's foreground probability 1 - softmax[background] (the paper is binary).
The VGG-19 encoder is torchvision's layout (`encoder_weights`: a local torchvision vgg19 file, classifier unused).

Parameters (3 in, 1 out per output): 29,290,274, the Keras model's trainable weights (its summary adds
7,296 BatchNorm moving statistics: 29,297,570 in all), counted from the code's layers ("~29.3M"); the paper prints
no count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import SEModule
from torch import nn

from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.blocks import ConvBNReLU
from medseg.models.registry import register_model

VGG19_SKIPS = (3, 8, 17, 26)  # torchvision vgg19.features: the ReLUs after block1_conv2 .. block4_conv4
VGG19_END = 36  # features[:36] ends with block5_conv4's ReLU (1/16); its last max-pooling is not used
ENCODER2_WIDTHS = (32, 64, 128, 256)
DECODER_WIDTHS = (256, 128, 64, 32)
ASPP_RATES = (6, 12, 18)


class ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, out_channels, bias=True),
                         ConvBNReLU(out_channels, out_channels, bias=True),
                         SEModule(out_channels, rd_channels=out_channels // 8, bias=False))


class ASPP(nn.Module):
    def __init__(self, in_channels: int, out_channels: int = 64):
        super().__init__()
        self.image = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, out_channels, 1, bias=True))
        self.branches = nn.ModuleList([ConvBNReLU(in_channels, out_channels, 1),
                                       *(ConvBNReLU(in_channels, out_channels, 3, dilation=r) for r in ASPP_RATES)])
        self.project = ConvBNReLU(out_channels * (len(ASPP_RATES) + 2), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1))


def up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


VGG19 = EncoderCard(family="torchvision", name="vgg19", module="encoder", first_conv="0.weight",
                    rename=(("features.", ""),))
CARD = NetworkCard(
    paper="Jha et al., DoubleU-Net: A Deep Convolutional Neural Network for Medical Image Segmentation, IEEE CBMS 2020",
    size_multiple=16, default_size=384, encoder=VGG19, head="head",
    paper_weights="ImageNet VGG-19 for the first encoder (paper Sec. III; Keras weights='imagenet')")


@register_model("doubleunet", CARD)
class DoubleUNet(SegmentationNetwork):
    """DoubleU-Net: VGG-19 U-Net with ASPP, whose output gates the input of a second U-Net with ASPP and SE blocks."""

    groups = {"encoder": ("encoder",)}

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        self.encoder = torchvision.models.vgg19(weights=None).features[:VGG19_END]
        if in_channels != 3:
            self.encoder[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
        skip1 = (64, 128, 256, 512)
        self.aspp1 = ASPP(512)
        self.decoder1 = nn.ModuleList()
        width = 64
        for skip, out in zip(reversed(skip1), DECODER_WIDTHS):
            self.decoder1.append(ConvBlock(width + skip, out))
            width = out
        self.encoder2 = nn.ModuleList()
        width = in_channels
        for out in ENCODER2_WIDTHS:
            self.encoder2.append(ConvBlock(width, out))
            width = out
        self.aspp2 = ASPP(ENCODER2_WIDTHS[-1])
        self.decoder2 = nn.ModuleList()
        width = 64
        for s1, s2, out in zip(reversed(skip1), reversed(ENCODER2_WIDTHS), DECODER_WIDTHS):
            self.decoder2.append(ConvBlock(width + s1 + s2, out))
            width = out
        self.head = nn.ModuleDict({"output1": nn.Conv2d(width, num_classes, 1),
                                   "output2": nn.Conv2d(width, num_classes, 1)})

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips1, y = [], x
        for i, layer in enumerate(self.encoder):
            y = layer(y)
            if i in VGG19_SKIPS:
                skips1.append(y)
        y = self.aspp1(y)
        for block, skip in zip(self.decoder1, reversed(skips1)):
            y = block(torch.cat([up2(y), skip], dim=1))
        output1 = self.head["output1"](y)
        gate = torch.sigmoid(output1) if output1.shape[1] == 1 else 1 - output1.softmax(dim=1)[:, :1]
        skips2, y = [], x * gate
        for block in self.encoder2:
            y = block(y)
            skips2.append(y)
            y = F.max_pool2d(y, 2)
        y = self.aspp2(y)
        for block, s1, s2 in zip(self.decoder2, reversed(skips1), reversed(skips2)):
            y = block(torch.cat([up2(y), s1, s2], dim=1))
        output2 = self.head["output2"](y)
        return [output2, output1] if self.training else output2
