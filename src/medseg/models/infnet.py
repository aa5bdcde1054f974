"""Inf-Net (Fan et al., "Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT Images", IEEE TMI 2020,
arXiv:2004.14133), the second-best network of M2SNet's COVID-19 table (arXiv:2303.10894, Table 3, "Inf-Net, R2-50"),
pinned down from the paper (Sec. III-A, Fig. 2) and the authors' code (DengPingFan/Inf-Net:
Code/model_lung_infection/InfNet_Res2Net.py, MyTrain_LungInf.py, Code/utils/format_conversion.py).

- Encoder (paper Sec. III-A; code `res2net50_v1b_26w_4s`): Res2Net-50-v1b = timm `res2net50d`, as PraNet and M2SNet;
  f1 = layer1 (256 ch, 1/4) feeds the edge branch, f3, f4, f5 = layer2..layer4 (512/1024/2048 ch) the rest.
  `encoder_weights: PATH` loads a local timm res2net50d checkpoint (nothing is downloaded).
- Parallel partial decoder and receptive field blocks (paper Sec. III-A.3): PraNet's (medseg.models.pranet), 32 ch,
  giving the global map S_g at 1/8.
- Edge attention (paper Sec. III-A.1, code `edge_conv1..4`): f1 -> 1x1 to 64 -> 3x3 -> 3x3 = the edge guidance
  feature e_att (64 ch, 1/4); a 3x3 conv to one channel gives the edge map, upsampled x4.
- Reverse attention (paper Sec. III-A.4, Eq. 3): as PraNet's, except that the edge guidance, resized to each level,
  is concatenated after the 1x1 reduction (code `ra4_conv2`: 256 + 64 in, `ra3_conv2` / `ra2_conv2`: 64 + 64 in).
- Conv unit: the code's `BasicConv2d` is conv (no bias) + BN without its ReLU (as PraNet's code); ReLU only after
  the RFB sum and between the reverse-attention convs, as in the code.

Training output (train mode): [S_2, S_3, S_4, S_g], each at the input size (test output S_2 first); eval mode
returns S_2 only. The code supervises the four region maps with the structure loss (weighted BCE + weighted IoU,
weight 1 each) and the edge map, upsampled to the input size, with plain BCE (BCEWithLogitsLoss, weight 1; paper
Eq. 1) against edge images it makes from the masks with Canny (`binary2edge`). medseg derives the
edge target from the batch's mask on the fly (`medseg.models.targets.mask_edges`, the one-pixel inner contour, see
there for how it compares with Canny): the training forward keeps the edge logits and `extra_losses(mask)` returns
{"edge": BCE with logits}, weighted by the recipe's `train.extra_loss_weights` (1, as the code).

Binary only (one sigmoid map as in the code's default `n_class=1`; the multi-class Semi-Inf-Net + FCN8s pipeline of
the paper's Sec. III-D is a separate system): `num_classes` must be 1.

Parameters (3 in, 1 out): 31,072,721 = the reference code's 33,121,721 (counted on InfNet_Res2Net.py, n_class=1)
less its Res2Net ImageNet classifier `resnet.fc` (2,049,000), which Inf-Net builds but never calls.
Inputs: any multiple of 32.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.pranet import ConvBN, PartialDecoder, ReceptiveFieldBlock, _resize
from medseg.models.registry import register_model
from medseg.models.targets import EdgeSupervised

ENCODER = "res2net50d"
RFB_WIDTH = 32
EDGE_WIDTH = 64


class EdgeBranch(nn.Module):
    """Edge attention (paper Sec. III-A.1): the guidance feature e_att and the one-channel edge map, both at 1/4."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.guidance = nn.Sequential(ConvBN(in_channels, EDGE_WIDTH), ConvBN(EDGE_WIDTH, EDGE_WIDTH, 3),
                                      ConvBN(EDGE_WIDTH, EDGE_WIDTH, 3))
        self.out = ConvBN(EDGE_WIDTH, 1, 3)

    def forward(self, low_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        guidance = self.guidance(low_level)
        return guidance, self.out(guidance)


class EdgeGuidedReverseAttention(nn.Module):
    """Reverse attention with the edge guidance concatenated after the 1x1 reduction (code `ra*_conv*`)."""

    def __init__(self, in_channels: int, width: int, kernel_size: int, inner_convs: int, out_kernel_size: int):
        super().__init__()
        self.reduce = ConvBN(in_channels, width)
        inner = [ConvBN(width + EDGE_WIDTH, width, kernel_size)]
        inner += [ConvBN(width, width, kernel_size) for _ in range(inner_convs - 1)]
        self.inner = nn.ModuleList(inner)
        self.out = ConvBN(width, 1, out_kernel_size)

    def forward(self, features: torch.Tensor, coarser: torch.Tensor, edge_guidance: torch.Tensor) -> torch.Tensor:
        reverse = 1 - torch.sigmoid(coarser)
        x = torch.cat([self.reduce(features * reverse), _resize(edge_guidance, features.shape[-2:])], dim=1)
        for conv in self.inner:
            x = torch.relu(conv(x))
        return self.out(x) + coarser


RES2NET50 = EncoderCard(family="timm", name=ENCODER, module="encoder", first_conv="conv1.0.weight")
CARD = NetworkCard(
    paper="Fan et al., Inf-Net: Automatic COVID-19 Lung Infection Segmentation from CT Images, IEEE TMI 2020",
    size_multiple=32, default_size=352, encoder=RES2NET50,
    paper_weights="an ImageNet Res2Net-50-v1b (the authors' code loads res2net50_v1b_26w_4s)")


@register_model("infnet", CARD)
class InfNet(EdgeSupervised, SegmentationNetwork):
    """Inf-Net: Res2Net-50 encoder, PraNet's RFBs and partial decoder, an edge branch guiding three reverse-attention
    stages (deep supervision; the edge map is the extra loss "edge")."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"infnet is binary only (its reverse attention reads one foreground map), got "
                              f"num_classes={num_classes}; set model.num_classes: 1")
        self.encoder = timm.create_model(ENCODER, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4),
                                         in_chans=in_channels)
        channels = self.encoder.feature_info.channels()  # 256, 512, 1024, 2048
        self.edge = EdgeBranch(channels[0])
        self.rfb = nn.ModuleList(ReceptiveFieldBlock(c, RFB_WIDTH) for c in channels[1:])
        self.decoder = PartialDecoder(RFB_WIDTH)
        # f5: 1x1 to 256, three 5x5, 1x1 out; f4 and f3: 1x1 to 64, two 3x3, 3x3 out (reference code)
        self.reverse = nn.ModuleList([EdgeGuidedReverseAttention(channels[3], 256, 5, 3, 1),
                                      EdgeGuidedReverseAttention(channels[2], 64, 3, 2, 3),
                                      EdgeGuidedReverseAttention(channels[1], 64, 3, 2, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        f2, f3, f4, f5 = self.encoder(x)
        edge_guidance, edge_map = self.edge(f2)
        global_map = self.decoder(self.rfb[2](f5), self.rfb[1](f4), self.rfb[0](f3))
        maps, coarser = [], global_map
        for attention, features in zip(self.reverse, (f5, f4, f3)):
            coarser = attention(features, _resize(coarser, features.shape[-2:]), edge_guidance)
            maps.append(coarser)
        s4, s3, s2 = (_resize(m, x.shape[-2:]) for m in maps)
        # scored by extra_losses against the mask's edges; an eval forward keeps nothing
        self.keep_for_losses(_resize(edge_map, x.shape[-2:]) if self.training else None)
        if not self.training:
            return s2
        return [s2, s3, s4, _resize(global_map, x.shape[-2:])]
