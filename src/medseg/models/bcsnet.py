"""BCS-Net (Cong et al., "BCS-Net: Boundary, Context, and Semantic for Automatic COVID-19 Lung Infection Segmentation
from CT Images", IEEE TIM 71, 2022), a baseline of M2SNet's COVID-19 table (arXiv:2303.10894, Table 3), pinned down from
the authors' released code (rmcong/BCS-Net-TIM22, BCS-NET.zip: module/network.py, module/modules.py, utils/utils.py,
test.py, Dataset/edgeutil.py). The paper's three blocks are the code's modules:

- Encoder: Res2Net-50-v1b (code `res2net50_v1b_26w_4s`) = timm `res2net50d`; f1..f4 = layer1..layer4 (256 / 512 /
  1024 / 2048 ch at 1/4..1/32). `encoder_weights: PATH` loads a local timm res2net50d checkpoint.
- Boundary (code `BAUnit`): on f1, 1x1 to 64 + ReLU, 3x3 + ReLU, 1x1 to one boundary map (no biases); its sigmoid,
  halved in size at each level (bilinear, scale 0.5), is added to the spatial attention of the next three levels.
- Context (code `AGGC`: attention-guided global context): on f2, f3, f4, a CBAM-style spatial attention (channel mean
  and max, 3x3 conv, sigmoid) plus the boundary map re-weights the features (F * A + F), then a global context
  block (code `GCM`: query / key 1x1 to C/8, value 1x1 to C, softmax(Q K) affinity, delta * (G * F) + F with a
  learnt delta starting at 0); on f2 only, an ASPP (image pooling, 1x1, 3x3 at rates 6 / 12 / 18, all to C/2, a 1x1
  fusion; convs with biases, no BN or activation).
- Semantic (code `SGU`): PraNet's receptive field blocks (32 ch) on f2, f3, f4; f4's upsampled (its 3x3 conv-BN is
  the one also applied to f3: the code reuses `conv_2`), f3's, and f2's strided 3x3 conv-BN summed at 1/16, then 1x1
  to 16 + ReLU, 3x3 + ReLU, 1x1 to the semantic map S_s. S_s (as logits, resized) re-weights each decoder input
  (X * S_s + X).
- Decoder (code `cat4` / `cat3` / `cat2` stacks, conv-BN units followed by ReLU): level 4: 1x1 to 256, 5x5, 1x1 to 64,
  3x3, 1x1 to the map S_4; level 3: the concatenation of level 3's context and level 4's 64 ch upsampled, 1x1 to 256,
  three 5x5, 1x1 to S_3; level 2: the concatenation of level 2's context and level 3's 256 ch upsampled, 1x1 to 256,
  5x5, 1x1 to 64, 1x1 to S_2, the prediction (code test.py).
- The code's conv unit `BasicConv2d` is conv (no bias) + BN: its ReLU is defined but never applied (as in PraNet).

Deviations and choices (ours, where the release is silent):
- The release is test code only. Its `bce_iou_loss` (utils/utils.py) is the structure loss (boundary-weighted BCE +
  IoU), so the recipe supervises the four region maps [S_2, S_3, S_4, S_s] with it, weight 1 each (ours). The boundary
  map is supervised by edge labels drawn from the masks with Canny (Dataset/edgeutil.py; its `TrainDataset` loads
  them as Inf-Net's loader does): medseg derives them from the batch's mask (`medseg.models.targets.mask_edges`, the
  one-pixel inner contour). The training forward keeps the boundary logits, upsampled x4 to the input size as the
  code's returned `boundary_map`, and `extra_losses(mask)` scores them with BCE with logits (ours, as Inf-Net's code
  scores its edge map; the release has no training loss for it), weighted by the recipe's
  `train.extra_loss_weights["edge"]` (1, ours).
- The code builds three `AttentionFusion` modules (1,772,544 parameters) that its forward never calls, and the
  Res2Net classifier (2,049,000); both are left out.

Binary only: the boundary and semantic maps that gate the features are one foreground channel each, so `num_classes`
must be 1.

Parameters (3 in, 1 out): 44,822,583 = the reference code's 48,644,127 (BCS_Net() counted on module/network.py) less
the unused classifier and AttentionFusion modules; the paper states no count. Inputs: any multiple of 32.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.pranet import ConvBN, ReceptiveFieldBlock
from medseg.models.registry import register_model
from medseg.models.targets import EdgeSupervised

ENCODER = "res2net50d"
SEMANTIC_WIDTH = 32


class BoundaryUnit(nn.Sequential):
    """BAU: three bias-free convs from f1 to one boundary map."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__(nn.Conv2d(in_channels, width, 1, bias=False), nn.ReLU(inplace=True),
                         nn.Conv2d(width, width, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                         nn.Conv2d(width, 1, 1, bias=False))


class SpatialAttention(nn.Module):
    """Channel mean and max, a 3x3 conv, sigmoid: one attention map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))


class GlobalContext(nn.Module):
    """GCM: a position affinity softmax(Q K) gathers the values; delta * (G * F) + F, delta learnt from 0."""

    def __init__(self, channels: int, squeeze: int = 8):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // squeeze, 1)
        self.key = nn.Conv2d(channels, channels // squeeze, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.delta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)  # (B, P, C')
        affinity = torch.softmax(query @ self.key(x).flatten(2), dim=-1)  # (B, P, P), normalised over the last axis
        gathered = (self.value(x).flatten(2) @ affinity).view(b, c, h, w)  # the code's bmm(V, affinity)
        return self.delta * (gathered * x) + x


class ASPP(nn.Module):
    """The code's ASPP: image pooling, 1x1 and 3x3 at rates 6 / 12 / 18 to C/2 each, a 1x1 fusion (biases, no BN)."""

    def __init__(self, channels: int):
        super().__init__()
        depth = channels // 2
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, depth, 1))
        self.branches = nn.ModuleList([nn.Conv2d(channels, depth, 1)] + [
            nn.Conv2d(channels, depth, 3, padding=rate, dilation=rate) for rate in (6, 12, 18)])
        self.fuse = nn.Conv2d(5 * depth, depth, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pooled(x), size=x.shape[-2:], mode="bilinear")
        return self.fuse(torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1))


class AttentionGuidedContext(nn.Module):
    """AGGC: (spatial attention + boundary) re-weights the features, then global context, then ASPP on f2."""

    def __init__(self, channels: int, pyramid: bool):
        super().__init__()
        self.attention = SpatialAttention()
        self.context = GlobalContext(channels)
        self.pyramid = ASPP(channels) if pyramid else nn.Identity()

    def forward(self, x: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
        attention = self.attention(x) + boundary
        return self.pyramid(self.context(x * attention + x))


class SemanticUnit(nn.Module):
    """SGU: f4, f3, f2 semantic features summed at 1/16, three bias-free convs to the semantic map."""

    def __init__(self, width: int):
        super().__init__()
        self.stride2 = ConvBN(width, width, 3)
        self.stride2[0].stride = (2, 2)
        self.same = ConvBN(width, width, 3)  # applied to both f4 and f3, as in the code
        self.head = nn.Sequential(nn.Conv2d(width, 16, 1, bias=False), nn.ReLU(inplace=True),
                                  nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.ReLU(inplace=True),
                                  nn.Conv2d(16, 1, 1, bias=False))

    def forward(self, s4: torch.Tensor, s3: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.same(s4), scale_factor=2, mode="bilinear", align_corners=True)
        return self.head(x + self.same(s3) + self.stride2(s2))


class DecoderStack(nn.Module):
    """conv-BN units, each followed by ReLU except the last (the level's map)."""

    def __init__(self, in_channels: int, layers: list[tuple[int, int]]):
        super().__init__()
        convs, channels = [], in_channels
        for width, kernel in layers:
            convs.append(ConvBN(channels, width, kernel))
            channels = width
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the features before the map, the map)."""
        for conv in self.convs[:-1]:
            x = torch.relu(conv(x))
        return x, self.convs[-1](x)


def _scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear")


RES2NET50 = EncoderCard(family="timm", name=ENCODER, module="encoder", first_conv="conv1.0.weight")
CARD = NetworkCard(
    paper="Cong et al., BCS-Net: Boundary, Context, and Semantic for Automatic COVID-19 Lung Infection Segmentation "
          "from CT Images, IEEE TIM 2022",
    size_multiple=32, default_size=352, encoder=RES2NET50,
    paper_weights="an ImageNet Res2Net-50-v1b (the authors' code loads res2net50_v1b_26w_4s)")


@register_model("bcsnet", CARD)
class BCSNet(EdgeSupervised, SegmentationNetwork):
    """BCS-Net: Res2Net-50, boundary unit, attention-guided global context, semantic guidance (deep supervision; the
    boundary map is the extra loss "edge")."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"bcsnet is binary only (its boundary and semantic maps are one foreground channel), "
                              f"got num_classes={num_classes}; set model.num_classes: 1")
        self.encoder = timm.create_model(ENCODER, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4),
                                         in_chans=in_channels)
        c1, c2, c3, c4 = self.encoder.feature_info.channels()  # 256, 512, 1024, 2048
        self.boundary = BoundaryUnit(c1)
        self.context = nn.ModuleList([AttentionGuidedContext(c2, pyramid=True), AttentionGuidedContext(c3, False),
                                      AttentionGuidedContext(c4, False)])
        self.semantic_blocks = nn.ModuleList(ReceptiveFieldBlock(c, SEMANTIC_WIDTH) for c in (c2, c3, c4))
        self.semantic = SemanticUnit(SEMANTIC_WIDTH)
        self.level4 = DecoderStack(c4, [(256, 1), (256, 5), (64, 1), (64, 3), (1, 1)])
        self.level3 = DecoderStack(c3 + 64, [(256, 1), (256, 5), (256, 5), (256, 5), (1, 1)])
        self.level2 = DecoderStack(c2 // 2 + 256, [(256, 1), (256, 5), (64, 1), (1, 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        f1, f2, f3, f4 = self.encoder(x)
        boundary_logits = self.boundary(f1)
        boundary = torch.sigmoid(boundary_logits)
        contexts = []
        for block, features in zip(self.context, (f2, f3, f4)):
            boundary = _scale(boundary, 0.5)  # 1/8, 1/16, 1/32
            contexts.append(block(features, boundary))
        g2, g3, g4 = contexts
        semantic = self.semantic(*(block(f) for block, f in zip(reversed(self.semantic_blocks), (f4, f3, f2))))
        guide = torch.sigmoid(semantic)  # at 1/16

        g4 = g4 * _scale(guide, 0.5) + g4
        g4, map4 = self.level4(g4)
        g3 = torch.cat([g3, _scale(g4, 2)], dim=1)
        g3 = g3 * guide + g3
        g3, map3 = self.level3(g3)
        g2 = torch.cat([g2, _scale(g3, 2)], dim=1)
        g2 = g2 * _scale(guide, 2) + g2
        _, map2 = self.level2(g2)
        prediction = _scale(map2, 8)
        # scored by extra_losses against the mask's edges; an eval forward keeps nothing
        self.keep_for_losses(_scale(boundary_logits, 4) if self.training else None)
        if not self.training:
            return prediction
        return [prediction, _scale(map3, 16), _scale(map4, 32), _scale(semantic, 16)]
