"""DeepLabV3+ on its own paper's backbone (Chen, Zhu, Papandreou, Schroff & Adam, "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", ECCV 2018), a baseline of Fovea-UNet's Table 3.

Fovea-UNet does not say which backbone its DeepLabV3+ row used. `deeplabv3plus` (in stsnet.py) is the
ResNeXt50-32x4d form of STS-Net's Table 6; this is the DeepLabV3+ paper's own best form (Sec. 4.3): the modified
aligned Xception-65 (timm `xception65`, a port of the DeepLab TensorFlow backbone) at output stride 16, ASPP with
rates 6, 12, 18 and image pooling, depthwise separable convs in ASPP and decoder, the decoder's 1x1 projection of
the 1/4 feature to 48 channels, bilinear x4 up twice. Composed with segmentation_models_pytorch's DeepLabV3Plus.
Where smp's decoder differs from the authors' TensorFlow code (ours, kept as smp builds it): one 3x3 separable conv
after the concatenation (the code: two), no BN-ReLU between its depthwise and pointwise parts; ASPP dropout 0.1
(the code's keep_prob 0.9; smp's default 0.5).
ImageNet weights only from a local timm xception65 file (`encoder_weights`; smp's timm-universal wrapper names the
blocks `model.blocks_N` where timm has `blocks.N`, renamed on loading; timm's classifier is unused).

Parameters (3 in, 2 classes): 41,037,122 (the paper prints no count).
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch

from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

XCEPTION65_BLOCKS = 21
XCEPTION65 = EncoderCard(
    family="timm", name="xception65", module="network.encoder", first_conv="model.stem_0.conv.weight",
    rename=(*((f"blocks.{i}.", f"model.blocks_{i}.") for i in range(XCEPTION65_BLOCKS)),
            ("stem.0.", "model.stem_0."), ("stem.1.", "model.stem_1."), ("", "model.")))
CARD = NetworkCard(
    paper="Chen et al., Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation "
          "(DeepLabV3+, Xception-65), ECCV 2018",
    size_multiple=16, default_size=512, paper_num_classes=2, head="network.segmentation_head", encoder=XCEPTION65,
    paper_weights="ImageNet (and JFT) Xception-65 (DeepLabV3+ paper Sec. 4)")


@register_model("deeplabv3plus_xception", CARD)
class DeepLabV3PlusXception(SegmentationNetwork):
    """DeepLabV3+ on aligned Xception-65 (output stride 16, ASPP 6/12/18), the DeepLabV3+ paper's own backbone."""

    groups = {"encoder": ("network.encoder",)}

    def __init__(self, in_channels: int = 3, num_classes: int = 2):
        super().__init__()
        self.network = smp.DeepLabV3Plus(encoder_name="tu-xception65", encoder_weights=None, in_channels=in_channels,
                                         classes=num_classes, encoder_output_stride=16,
                                         decoder_atrous_rates=(6, 12, 18), decoder_aspp_dropout=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)
