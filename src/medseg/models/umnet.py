"""UM-Net (Du et al., "UM-Net: Rethinking ICGNet for polyp segmentation with uncertainty modeling", Medical Image
Analysis 99, 103347, 2025), a baseline of STS-Net's Table 1 (Sci. Rep. 2025), pinned down from the authors' code
(dxqllp/UM-Net: UM-Net.py, modules.py; the repository has no training script, the contour loss is that of the
network's earlier name, umICGNet: chip-xu/umICGNet: utils/loss.py, utils/sobel.py, train.py in its history).

- Encoder: torchvision ResNet-34 (the code loads ImageNet weights): e1 = ReLU(BN(conv1)) at 1/2, e2..e5 = layer1..4;
  e3, e4, e5 reduced to 64 ch by 1x1 conv-BN-ReLU. `encoder_weights: PATH` loads a local torchvision resnet34 file.
- Local-global modules (code `ALGM`), on e5, e4, e3, e2: 3x3 conv-BN-ReLU to 16 ch; four context branches: an
  embedded-Gaussian non-local block (2x2 max-pooled keys / values, no 1/sqrt(d) scaling, its output BN starting at
  0) and three dense dilated 3x3 conv-BN-ReLU (inputs 16, 32, 48 ch; dilations 1/3/5, 2/6/10, 3/9/15, 4/12/20 per
  level); concatenated (64 ch); per output an SE (reduction 16) + 3x3 conv-BN-ReLU. The 1/32 module makes four
  outputs (one for its own level, three passed down), the 1/16 three, 1/8 two, 1/4 one; a cascaded module adds
  conv-BN-ReLU(|upsampled coarser output - own output|) to each output.
- Contour branch (code `cbam`): on e1, conv-BN-ReLU, CBAM (channel MLP reduction 16 on avg and max, 7x7 spatial
  conv on [max, mean]), conv-BN-ReLU, to 64 ch at 1/2. Its contour head (code `line_predict`, a 3x3 conv to one
  map; umICGNet's is a 1x1 conv, dxqllp/UM-Net's kernel is kept) runs in training mode only (nothing else reads it).
- Reverse context guidance (code `RCG`), at 1/16, 1/8, 1/4: the encoder feature times 1 - sigmoid(previous side
  output), concatenated with the resized contour feature, 3x3 conv-BN-ReLU, times a 1x1-conv sigmoid gate, plus
  the encoder feature.
- Decoder (code `DecoderBlock`): conv-BN-ReLU to C/4, conv-BN-ReLU to 64, x2 bilinear (align_corners); inputs are
  [decoder, ALGM output, RCG output] (192 ch) below 1/32. Side outputs (code `SideoutBlock`): conv-BN-ReLU to C/4,
  Dropout2d(0.1), 1x1 conv, at 1/2, 1/4, 1/8, 1/16.
- Fusion (code `HPPF`): the 1/2, 1/4, 1/8 decoder maps resized and concatenated (192 ch); a channel gate
  sigmoid(MLP(z)) with z = (avg pool + 1x1-conv'd 4x4 max pool + 1x1-conv'd 8x8 max pool, reshaped to 192 values)
  // 3 - the code's floor division, kept (it zeroes the gate's gradient to the features); then a 3x3 conv-BN-ReLU
  to 64 ch and the head (conv-BN-ReLU to 32, Dropout2d(0.1), 1x1 conv) upsampled to the input size.
- Outputs: the code returns sigmoid maps [main, side 1/2, 1/4, 1/8, 1/16, contour]; medseg returns logits, in
  training mode [main, side 1/2, 1/4, 1/8, 1/16] (deep supervision against the mask, the losses resize the mask),
  in eval mode the main map. Binary only: the side outputs that drive the reverse guidance are one map.
- Contour loss (umICGNet utils/loss.py `Deep_Loss`, `Focal_loss`): the training forward keeps the contour logits
  (1/2 size) and `extra_losses(mask)` returns {"contour": focal(sobel_edges(sigmoid(contour)), target)}, the target
  `mask_sobel_edges` of the mask halved bilinearly (medseg.models.targets: both soft magnitudes, no threshold).
  The focal loss takes the two soft maps as probability and label: mean over pixels of
  -alpha (1 - p)^gamma log(p + eps) y - (1 - alpha) p^gamma log(1 - p + eps) (1 - y), alpha 0.25, gamma 2, eps 1e-7;
  where p exceeds 1 (only on the image border, p at most sqrt(1 + 1e-4)) the code's log(1 - p + eps) is NaN,
  medseg's clamps 1 - p at 0 (ours). The code adds it with weight 1 to the mean of the five maps' losses (the
  recipe's `train.extra_loss_weights`). Every eval forward drops the kept logits.

Parameters (3 in, 1 out): 22,752,210 = the reference code's UM-Net(1) count 22,789,266 (STS-Net Table 1: 22.78M;
the code's class name "UM-Net" is not valid Python, counted as UMNet) less the one module its forward never
reaches: the 1/32 ALGM's cascade conv-BN (37,056 = 64*64*9 + 64 + 2*64; that module is not cascaded). The contour
head is the code's 577 (64*9 + 1); umICGNet's 1x1 head would have 65.
Inputs: multiples of 32, at least 64 px (the 1/32 non-local block pools 2 x 2). Checked against the reference code
(its weights copied across, eval mode): sigmoid of the main output equals the code's to 6e-8 at 128 x 160. The
contour branch and head given the code's `cbam` and `line_predict` weights, and the contour loss, equal the code's
exactly (on one e1 at 1/2 of 128 x 160, BN in training and eval mode; the loss against umICGNet's Sobel and
Focal_loss run on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import SEModule
from torch import nn

from medseg.errors import MedsegError
from medseg.models.acsnet import NonLocalBlock
from medseg.models.base import EncoderCard, ExtraLosses, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model
from medseg.models.targets import mask_sobel_edges, sobel_edges

WIDTH = 64
ALGM_DILATIONS = ((1, 3, 5), (2, 6, 10), (3, 9, 15), (4, 12, 20))  # 1/32, 1/16, 1/8, 1/4 (code pool_size)
MIN_SIZE = 64
CONTOUR_FOCAL_ALPHA, CONTOUR_FOCAL_GAMMA, CONTOUR_FOCAL_EPS = 0.25, 2.0, 1e-7  # umICGNet utils/loss.py Focal_loss


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class LocalGlobalModule(nn.Module):
    """Code ALGM: non-local + dense dilated context on 16 channels, SE-gated outputs, optional cascade."""

    def __init__(self, dilations: tuple[int, int, int], outputs: int, cascade: bool):
        super().__init__()
        inner = WIDTH // 4
        self.reduce = _conv_bn_relu(WIDTH, inner)
        self.non_local = NonLocalBlock(inner)  # the code's block is ACSNet's (same layers, BN started at 0)
        self.dilated = nn.ModuleList(_conv_bn_relu(inner * (i + 1), inner, dilation=d) for i, d in enumerate(dilations))
        self.outputs = nn.ModuleList(nn.Sequential(SEModule(WIDTH, rd_channels=WIDTH // 16, bias=False),
                                                   _conv_bn_relu(WIDTH, WIDTH)) for _ in range(outputs))
        self.cascade = _conv_bn_relu(WIDTH, WIDTH) if cascade else None

    def forward(self, x: torch.Tensor, coarser: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        x = self.reduce(x)
        dense = [x]
        for conv in self.dilated:
            dense.append(conv(torch.cat(dense, dim=1)))
        context = torch.cat([self.non_local(x), *dense[1:]], dim=1)
        outs = [head(context) for head in self.outputs]
        if self.cascade is None:
            return outs
        return [out + self.cascade((F.interpolate(c, x.shape[-2:], mode="bilinear", align_corners=True) - out).abs())
                for out, c in zip(outs, coarser)]


class CBAM(nn.Module):
    """Channel attention (shared MLP on avg and max pools) then spatial attention (7x7 conv on [max, mean])."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(channels // reduction, channels, 1, bias=False))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))
        maps = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(maps))


class ReverseContextGuidance(nn.Module):
    """Code RCG: reverse attention of the previous side output, fused with the contour feature, gated, residual."""

    def __init__(self):
        super().__init__()
        self.fuse = _conv_bn_relu(2 * WIDTH, WIDTH)
        self.gate = nn.Sequential(nn.Conv2d(WIDTH, 1, 1), nn.Sigmoid())

    def forward(self, side_logits: torch.Tensor, contour: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        reverse = (1 - torch.sigmoid(side_logits)) * feature
        contour = F.interpolate(contour, feature.shape[-2:], mode="bilinear", align_corners=True)
        fused = self.fuse(torch.cat([contour, reverse], dim=1))
        return self.gate(fused) * fused + feature


class DecoderBlock(nn.Sequential):
    def __init__(self, in_channels: int):
        super().__init__(_conv_bn_relu(in_channels, in_channels // 4), _conv_bn_relu(in_channels // 4, WIDTH),
                         nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))


class SideOutput(nn.Sequential):
    def __init__(self):
        super().__init__(_conv_bn_relu(WIDTH, WIDTH // 4), nn.Dropout2d(0.1), nn.Conv2d(WIDTH // 4, 1, 1))


class PyramidPoolingFusion(nn.Module):
    """Code HPPF: a channel gate from average and 4x4 / 8x8 max pools of the three decoder maps, then a conv."""

    def __init__(self, channels: int = 3 * WIDTH):
        super().__init__()
        # 4 x 4 x C/16 and 8 x 8 x C/64 values: C each, read as one more C-vector
        self.pool4 = nn.Sequential(nn.AdaptiveMaxPool2d(4), nn.Conv2d(channels, channels // 16, 1), nn.ReLU())
        self.pool8 = nn.Sequential(nn.AdaptiveMaxPool2d(8), nn.Conv2d(channels, channels // 64, 1), nn.ReLU())
        self.gate = nn.Sequential(nn.Conv2d(channels, channels // 8, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(channels // 8, channels, 1), nn.Sigmoid())
        self.out = _conv_bn_relu(channels, channels // 3)

    def forward(self, fine: torch.Tensor, middle: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        size = fine.shape[-2:]
        feat = torch.cat([fine, *(F.interpolate(t, size, mode="bilinear", align_corners=True)
                                  for t in (middle, coarse))], dim=1)
        b, c = feat.shape[:2]
        pooled = feat.mean((2, 3), keepdim=True) + self.pool4(feat).reshape(b, c, 1, 1) \
            + self.pool8(feat).reshape(b, c, 1, 1)
        z = torch.div(pooled, 3, rounding_mode="floor")  # the code's `// 3`
        return self.out(self.gate(z) * feat)


def contour_focal_loss(edges: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """umICGNet's `Focal_loss` between soft edge maps (the prediction's as probability, the mask's as label), mean
    over every pixel; 1 - p is clamped at 0 where the code's log would be NaN (ours)."""
    positive = -CONTOUR_FOCAL_ALPHA * (1 - edges) ** CONTOUR_FOCAL_GAMMA * torch.log(edges + CONTOUR_FOCAL_EPS)
    negative = -(1 - CONTOUR_FOCAL_ALPHA) * edges ** CONTOUR_FOCAL_GAMMA \
        * torch.log((1 - edges).clamp(min=0) + CONTOUR_FOCAL_EPS)
    return (positive * target + negative * (1 - target)).mean()


RESNET34 = EncoderCard(family="torchvision", name="resnet34", module="encoder", first_conv="conv1.weight")
CARD = NetworkCard(paper="Du et al., UM-Net: Rethinking ICGNet for polyp segmentation with uncertainty modeling, "
                         "Medical Image Analysis 2025", size_multiple=32, default_size=352, encoder=RESNET34,
                   head="final", paper_weights="an ImageNet ResNet-34 (the authors' code loads torchvision's)")


@register_model("umnet", CARD)
class UMNet(ExtraLosses, SegmentationNetwork):
    """UM-Net: ResNet-34, local-global modules, contour-guided reverse attention, pyramid fusion (deep sup.; the
    contour head is the extra loss "contour")."""


    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"umnet is binary only (its reverse guidance reads one foreground map), got "
                              f"num_classes={num_classes}; set model.num_classes: 1")
        self.encoder = torchvision.models.resnet34(weights=None)
        self.encoder.fc = nn.Identity()  # the classifier is never used
        if in_channels != 3:
            self.encoder.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.reduce = nn.ModuleList(_conv_bn_relu(c, WIDTH, kernel_size=1) for c in (128, 256, 512))  # e3, e4, e5
        self.local_global = nn.ModuleList(LocalGlobalModule(d, outputs=4 - i, cascade=i > 0)
                                          for i, d in enumerate(ALGM_DILATIONS))  # 1/32, 1/16, 1/8, 1/4
        self.contour = nn.Sequential(_conv_bn_relu(WIDTH, WIDTH), CBAM(WIDTH), _conv_bn_relu(WIDTH, WIDTH))
        self.contour_head = nn.Conv2d(WIDTH, 1, 3, padding=1)  # code line_predict
        self.guidance = nn.ModuleList(ReverseContextGuidance() for _ in range(3))  # 1/16, 1/8, 1/4
        self.decoder = nn.ModuleList([DecoderBlock(WIDTH), *(DecoderBlock(3 * WIDTH) for _ in range(3))])
        self.sides = nn.ModuleList(SideOutput() for _ in range(4))  # 1/16, 1/8, 1/4, 1/2
        self.fusion = PyramidPoolingFusion()
        self.final = nn.Sequential(_conv_bn_relu(WIDTH, 32), nn.Dropout2d(0.1), nn.Conv2d(32, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"umnet needs inputs of at least {MIN_SIZE} px (its 1/32 non-local block pools 2 x 2), "
                             f"got {tuple(x.shape[-2:])}")
        enc = self.encoder
        e1 = enc.relu(enc.bn1(enc.conv1(x)))
        e2 = enc.layer1(enc.maxpool(e1))
        e3 = enc.layer2(e2)
        e4 = enc.layer3(e3)
        e5 = enc.layer4(e4)
        skips = [e2, *(reduce(e) for reduce, e in zip(self.reduce, (e3, e4)))]  # 1/4, 1/8, 1/16 at 64 ch
        top = self.local_global[0](self.reduce[2](e5))  # 4 outputs: its own, then the three passed down
        context, contexts = top, []
        for module, feature in zip(self.local_global[1:], skips[::-1]):  # 1/16, 1/8, 1/4
            context = module(feature, context[1:])
            contexts.append(context[0])
        contour = self.contour(e1)
        self.keep_for_losses(self.contour_head(contour) if self.training else None)
        d = self.decoder[0](top[0])  # 1/16
        sides, maps = [self.sides[0](d)], [d]
        for i, (feature, ctx) in enumerate(zip(skips[::-1], contexts)):
            guided = self.guidance[i](sides[-1], contour, feature)
            d = self.decoder[i + 1](torch.cat([d, ctx, guided], dim=1))  # 1/8, 1/4, 1/2
            maps.append(d)
            sides.append(self.sides[i + 1](d))
        main = F.interpolate(self.final(self.fusion(maps[3], maps[2], maps[1])), x.shape[-2:], mode="bilinear",
                             align_corners=True)
        if not self.training:
            return main
        return [main, *sides[::-1]]  # main, then 1/2, 1/4, 1/8, 1/16

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"contour": the code's focal loss between the Sobel edges of the last training forward's contour map and
        of `mask` (N, H, W labels)}; the kept logits are released, so each is scored once."""
        logits = self.take_kept()
        edges = sobel_edges(torch.sigmoid(logits.float()))
        return {"contour": contour_focal_loss(edges, mask_sobel_edges(mask, logits.shape[-2:]))}
