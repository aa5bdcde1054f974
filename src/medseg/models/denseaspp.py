"""DenseASPP (Yang et al., "DenseASPP for Semantic Segmentation in Street Scenes", CVPR 2018), a baseline of STS-Net's
Table 1 (Sci. Rep. 2025), on DenseNet-121, pinned down from the paper (Sec. 3, Fig. 2) and the authors' code
(DeepMotionAIResearch/DenseASPP: models/DenseASPP.py, cfgs/DenseASPP121.py).

- Encoder (paper Sec. 3.3, code): torchvision DenseNet-121 (growth 32, blocks 6-12-24-16) made dilated to output
  stride 8 as the code does: no average pooling in transitions 2 and 3, 3x3 convs of dense block 3 dilated 2 and of
  block 4 dilated 4. `encoder_weights: PATH` loads a local torchvision densenet121 file (its norm5 and classifier
  are unused: DenseASPP's stage after block 4 differs).
- After block 4 (code): a fourth transition (BN, ReLU, 1x1 conv 1024 -> 512, no pooling) and BN (`norm5`, 512 ch).
- DenseASPP (paper Sec. 3.2, code `_DenseAsppBlock`): five atrous layers with rates 3, 6, 12, 18, 24, each
  [BN (not on the first),] ReLU, 1x1 conv to 128, BN, ReLU, 3x3 conv with that dilation to 64, dropout 0.1; every
  layer reads the concatenation of the backbone feature and all earlier layers' outputs. The first layer's ReLU is
  in place in the code, so the backbone feature passed on is ReLU(norm5); medseg applies that ReLU explicitly.
- Head (code): dropout 0.1, 1x1 conv from 512 + 5 x 64 = 832 channels, x8 bilinear upsampling (align_corners=True,
  how the code's PyTorch 0.3 nn.Upsample behaved).
- ASPP BN momentum 0.0003 and Kaiming-uniform conv init with unit BN weights, as in the code.

STS-Net's Table 1 lists DenseASPP with 46.15 M parameters, which matches none of the authors' configurations (for
one output: DenseNet-121 8,265,857; -169 18,390,561; -201 28,601,089; -161 35,364,017, counted on the code); STS-Net
gives no code or backbone, so medseg pins the authors' DenseNet-121 configuration (the backbone named by the
issue and the paper's Sec. 4 ablations) and reports the gap (ours).

Parameters (3 in, 1 out): 8,265,857, equal to the reference code's DenseASPP(DenseASPP121 cfg, n_class=1).
Inputs: any multiple of 8; multi-class heads (`num_classes` > 1) are as in the code (softmax over 19 classes there).
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

ASPP_RATES = (3, 6, 12, 18, 24)
ASPP_INNER, ASPP_GROWTH = 128, 64  # code: d_feature0, d_feature1
DROPOUT = 0.1  # code: dropout0 and dropout1
ASPP_BN_MOMENTUM = 0.0003


class DenseAsppLayer(nn.Sequential):
    """One atrous layer: [BN, ReLU,] 1x1 conv, BN, ReLU, dilated 3x3 conv, dropout (code `_DenseAsppBlock`); the
    first layer's ReLU is applied by the network to the backbone feature (see `DenseASPP.forward`)."""

    def __init__(self, in_channels: int, dilation: int, leading_bn: bool):
        layers: list[nn.Module] = []
        if leading_bn:
            layers += [nn.BatchNorm2d(in_channels, momentum=ASPP_BN_MOMENTUM), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(in_channels, ASPP_INNER, 1),
                   nn.BatchNorm2d(ASPP_INNER, momentum=ASPP_BN_MOMENTUM), nn.ReLU(inplace=True),
                   nn.Conv2d(ASPP_INNER, ASPP_GROWTH, 3, padding=dilation, dilation=dilation), nn.Dropout2d(DROPOUT)]
        super().__init__(*layers)


def dilated_densenet121(in_channels: int) -> nn.Sequential:
    """torchvision DenseNet-121's features at output stride 8 (code: DenseASPP121 with output_stride 8), no norm5."""
    features = torchvision.models.densenet121(weights=None).features
    del features.norm5  # DenseASPP normalises after its own fourth transition
    if in_channels != 3:
        features.conv0 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    features.transition2.pool = nn.Identity()
    features.transition3.pool = nn.Identity()
    for block, dilation in ((features.denseblock3, 2), (features.denseblock4, 4)):
        for layer in block.children():
            layer.conv2.dilation, layer.conv2.padding = (dilation, dilation), (dilation, dilation)
    return features


DENSENET121 = EncoderCard(family="torchvision", name="densenet121", module="encoder", first_conv="conv0.weight",
                          rename=(("features.", ""),))
CARD = NetworkCard(
    paper="Yang, Yu, Zhang, Li & Yang, DenseASPP for Semantic Segmentation in Street Scenes, CVPR 2018",
    size_multiple=8, default_size=512, paper_num_classes=2, encoder=DENSENET121,  # a softmax head, as the code's
    paper_weights="an ImageNet DenseNet-121 (the authors' code loads ./pretrained/densenet121.pth)")


@register_model("denseaspp", CARD)
class DenseASPP(SegmentationNetwork):
    """DenseASPP: dilated DenseNet-121 (stride 8), densely connected atrous layers (rates 3-24), x8 upsampling."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        self.encoder = dilated_densenet121(in_channels)
        backbone_channels = 1024 // 2
        self.transition4 = nn.Sequential(nn.BatchNorm2d(1024), nn.ReLU(inplace=True),
                                         nn.Conv2d(1024, backbone_channels, 1, bias=False))
        self.norm5 = nn.BatchNorm2d(backbone_channels)
        self.aspp = nn.ModuleList(DenseAsppLayer(backbone_channels + i * ASPP_GROWTH, rate, leading_bn=i > 0)
                                  for i, rate in enumerate(ASPP_RATES))
        self.head = nn.Sequential(nn.Dropout2d(DROPOUT),
                                  nn.Conv2d(backbone_channels + len(ASPP_RATES) * ASPP_GROWTH, num_classes, 1),
                                  nn.Upsample(scale_factor=8, mode="bilinear", align_corners=True))
        for module in self.modules():  # the code's init (a loaded encoder file overwrites its part)
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the code's first atrous layer starts with an in-place ReLU on norm5's output, so the backbone feature that is
        # concatenated on is ReLU(norm5(...)) there too
        feature = torch.relu(self.norm5(self.transition4(self.encoder(x))))
        for layer in self.aspp:
            feature = torch.cat([layer(feature), feature], dim=1)  # the code puts each new output first
        return self.head(feature)
