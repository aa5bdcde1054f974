"""SegNet (Badrinarayanan, Kendall & Cipolla, "SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
Segmentation", IEEE TPAMI 2017), a baseline of Fovea-UNet's Table 3.

- Encoder (Sec. 3): the 13 convolutional layers of VGG16, each conv3x3 (bias) -> BatchNorm -> ReLU, five 2x2
  max-poolings (stride 2) that keep their argmax indices. Built as torchvision's `vgg16_bn().features`, so a
  local torchvision vgg16_bn file loads into the encoder slot (`encoder_weights`; the classifier is unused). The
  paper initialises from VGG16 trained on ImageNet (Sec. 3); a plain vgg16 file lacks the BN tensors and is refused.
- Decoder (Sec. 3, Fig. 3; the authors' Caffe model, SegNet-Tutorial `segnet_train.prototxt`): per level, max
  unpooling with the encoder's indices, then the mirror of the encoder's convs (conv3x3 -> BN -> ReLU), the last
  conv of a level reducing to the next level's width (512, 512 -> 256, 256 -> 128, 128 -> 64, 64); the final
  layer is a 3x3 conv to the classes, with no BN or ReLU (the prototxt's `conv1_1_D` before the soft-max).
- Parameters (3 in, 1 out): 29,443,585; 29,444,162 with 2 classes. The paper gives "29.5M" (ENet, Paszke et al.
  2016, Table 3: "29.46M" for SegNet): within 0.2 %. Compute, 12 classes, 360 x 640: 284.3 GFLOPs (torch's
  FlopCounter, measured at 352 x 640 and scaled) against ENet Table 3's 286.03 for SegNet.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.blocks import ConvBNReLU
from medseg.models.registry import register_model

# decoder level (deepest first): the widths of its convs' outputs, mirroring VGG16's blocks 5..1
DECODER_WIDTHS = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))

VGG16_BN = EncoderCard(family="torchvision", name="vgg16_bn", module="encoder", first_conv="0.weight",
                       rename=(("features.", ""),))
CARD = NetworkCard(
    paper="Badrinarayanan, Kendall & Cipolla, SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image "
          "Segmentation, IEEE TPAMI 2017",
    size_multiple=32, default_size=512, paper_num_classes=2, encoder=VGG16_BN,
    paper_weights="ImageNet VGG16 for the encoder (paper Sec. 3)")


@register_model("segnet", CARD)
class SegNet(SegmentationNetwork):
    """SegNet: VGG16-BN encoder, decoder upsampling with the encoder's max-pooling indices (no skip features)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        self.encoder = torchvision.models.vgg16_bn(weights=None).features
        if in_channels != 3:
            first = self.encoder[0]
            self.encoder[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
        for module in self.encoder:
            if isinstance(module, nn.MaxPool2d):
                module.return_indices = True
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        levels, width = [], 512
        for widths in DECODER_WIDTHS:
            convs = []
            for out in widths:
                convs.append(ConvBNReLU(width, out, bias=True))
                width = out
            levels.append(nn.Sequential(*convs))
        self.decoder = nn.ModuleList(levels)
        self.head = nn.Conv2d(width, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []  # (indices, size before pooling) of each max-pooling, shallowest first
        for module in self.encoder:
            if isinstance(module, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = module(x)
                pooled.append((indices, size))
            else:
                x = module(x)
        for level, (indices, size) in zip(self.decoder, reversed(pooled)):
            x = level(self.unpool(x, indices, output_size=size))
        return self.head(x)
