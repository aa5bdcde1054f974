"""ACSNet (Zhang et al., "Adaptive Context Selection for Polyp Segmentation", MICCAI 2020), a baseline of M2SNet's
video-polyp table (arXiv:2303.10894, Table 2), pinned down from the paper (Sec. 2, Fig. 1) and the authors' code
(ReaFly/ACSNet: models/ACSNet.py, models/modules.py, utils/loss.py, train.py, opt.py).

- Encoder (paper Sec. 2; code): torchvision ResNet-34: e1 = ReLU(BN(conv1)) at 1/2, e2..e5 = layer1..layer4
  (64/128/256/512 ch at 1/4..1/32). `encoder_weights: PATH` loads a local torchvision resnet34 file (its fc unused).
- Decoder blocks (code `DecoderBlock`): conv-BN-ReLU to in/4 channels, conv-BN-ReLU to the output width, x2 bilinear
  upsampling; widths 512, 256, 128, 64, 64.
- Local context attention (paper Eq. 1, code `LCA`, no parameters): the encoder skip times 1 + (1 - |sigmoid(side
  output) - 0.5| / 0.5), i.e. uncertain pixels of the previous side prediction are emphasised.
- Global context module (paper Sec. 2.2, code `GCM`): on e5, adaptive average pools 1/3/5 (1x1 conv, ReLU, resized
  back) and a 1x1 conv + ReLU + non-local block, concatenated (4 x 64 ch), then per decoder level a 3x3 conv + ReLU
  to 256/128/64/64 channels resized to that level.
- Adaptive selection module (paper Sec. 2.3, code `ASM`): non-local block on the decoder feature, concatenation with
  the local and global contexts, squeeze-and-excitation (reduction 16, no biases; timm's SEModule).
- Non-local block (Wang et al. 2018, embedded Gaussian as in the code): theta / phi / g 1x1 convs to C/2, phi and g
  max-pooled 2x2, softmax affinity, 1x1 conv back + BN whose weight and bias start at 0 (the block starts as the
  identity).
- Side outputs (code `SideoutBlock`): conv-BN-ReLU to C/4, Dropout2d(0.1), 1x1 conv to 1 channel, at 1/2..1/16.
  Deep supervision (code utils/loss.py): BCE + Dice on the main output and each side output against the mask
  downscaled to its size, summed. In training mode `forward` returns [main, side 1/2, 1/4, 1/8, 1/16] at their own
  sizes (the loss resizes the mask, nearest; the code resizes it bilinearly); in eval mode the main output only.

Binary only: the side outputs that drive the local context attention are one foreground map (the code's `nclasses`
changes only the last conv), so `num_classes` must be 1.

Parameters (3 in, 1 out): 29,450,709, equal to the reference code's ACSNet(1) (torchvision resnet34 without its fc).
The paper states no count. Inputs: any multiple of 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import SEModule
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

ENCODER_CHANNELS = (64, 64, 128, 256, 512)  # e1..e5
DECODER_WIDTHS = (512, 256, 128, 64, 64)  # d5..d1
GLOBAL_WIDTH = 64
GLOBAL_OUT = (256, 128, 64, 64)  # the global context given to the levels of d5, d4, d3, d2
POOL_SIZES = (1, 3, 5)
MIN_SIZE = 64  # the 1/32 map must survive the non-local blocks' 2 x 2 max pooling


class ConvBNReLU(nn.Sequential):
    """The code's ConvBlock: a 3x3 conv WITH bias, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class DecoderBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvBNReLU(in_channels, in_channels // 4), ConvBNReLU(in_channels // 4, out_channels),
                         nn.Upsample(scale_factor=2, mode="bilinear"))


class SideOutput(nn.Sequential):
    def __init__(self, in_channels: int):
        inner = in_channels // 4
        super().__init__(ConvBNReLU(in_channels, inner), nn.Dropout2d(0.1), nn.Conv2d(inner, 1, 1))


class NonLocalBlock(nn.Module):
    """Embedded-Gaussian non-local block with 2x2 max-pooled keys and values; starts as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(channels // 2, 1)
        self.value = nn.Sequential(nn.Conv2d(channels, inner, 1), nn.MaxPool2d(2))
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Sequential(nn.Conv2d(channels, inner, 1), nn.MaxPool2d(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        key = self.key(x).flatten(2)  # (B, C', hw)
        value = self.value(x).flatten(2).transpose(1, 2)  # (B, hw, C')
        attended = torch.softmax(query @ key, dim=-1) @ value  # (B, HW, C')
        return x + self.out(attended.transpose(1, 2).reshape(b, -1, h, w))


class GlobalContext(nn.Module):
    """GCM: pooled and non-local context of e5, fused and projected for each decoder level."""

    def __init__(self, in_channels: int):
        super().__init__()
        branches = [nn.Sequential(nn.AdaptiveAvgPool2d(s), nn.Conv2d(in_channels, GLOBAL_WIDTH, 1),
                                  nn.ReLU(inplace=True)) for s in POOL_SIZES]
        branches.append(nn.Sequential(nn.Conv2d(in_channels, GLOBAL_WIDTH, 1), nn.ReLU(inplace=True),
                                      NonLocalBlock(GLOBAL_WIDTH)))
        self.branches = nn.ModuleList(branches)
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4 * GLOBAL_WIDTH, c, 3, padding=1), nn.ReLU(inplace=True)) for c in GLOBAL_OUT)

    def forward(self, x: torch.Tensor, sizes: list[torch.Size]) -> list[torch.Tensor]:
        pooled = [F.interpolate(branch(x), x.shape[-2:], mode="bilinear", align_corners=True)
                  for branch in self.branches[:-1]]
        context = torch.cat([*pooled, self.branches[-1](x)], dim=1)
        return [F.interpolate(out(context), size, mode="bilinear") for out, size in zip(self.outputs, sizes)]


class AdaptiveSelection(nn.Module):
    """ASM: non-local on the decoder feature, concatenated with local and global context, re-weighted by SE."""

    def __init__(self, decoder_channels: int, all_channels: int):
        super().__init__()
        self.non_local = NonLocalBlock(decoder_channels)
        self.select = SEModule(all_channels, rd_channels=all_channels // 16, bias=False)

    def forward(self, local: torch.Tensor, decoded: torch.Tensor, global_context: torch.Tensor) -> torch.Tensor:
        return self.select(torch.cat([local, self.non_local(decoded), global_context], dim=1))


def local_context_attention(features: torch.Tensor, side_logits: torch.Tensor) -> torch.Tensor:
    """LCA: features * (1 + uncertainty), uncertainty = 1 - |p - 0.5| / 0.5 of the side prediction p."""
    uncertainty = 1 - (torch.sigmoid(side_logits) - 0.5).abs() / 0.5
    return features * uncertainty + features


RESNET34 = EncoderCard(family="torchvision", name="resnet34", module="encoder", first_conv="conv1.weight")
CARD = NetworkCard(paper="Zhang et al., Adaptive Context Selection for Polyp Segmentation (ACSNet), MICCAI 2020",
                   size_multiple=32, default_size=320, encoder=RESNET34,
                   paper_weights="an ImageNet ResNet-34 (the authors' code loads torchvision's)")


@register_model("acsnet", CARD)
class ACSNet(SegmentationNetwork):
    """ACSNet: ResNet-34 encoder, local context attention, global context module, adaptive selection (deep sup.)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"acsnet is binary only (its local context attention reads one foreground map), got "
                              f"num_classes={num_classes}; set model.num_classes: 1")
        self.encoder = torchvision.models.resnet34(weights=None)
        self.encoder.fc = nn.Identity()  # the classifier is never used
        if in_channels != 3:
            self.encoder.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        e1, e2, e3, e4, e5 = ENCODER_CHANNELS
        d5, d4, d3, d2, d1 = DECODER_WIDTHS
        g5, g4, g3, g2 = GLOBAL_OUT
        # the input of each level's decoder block is what the adaptive selection concatenates at that level
        inputs = (e5, e4 + d5 + g5, e3 + d4 + g4, e2 + d3 + g3, e1 + d2 + g2)
        self.decoder = nn.ModuleList(DecoderBlock(i, o) for i, o in zip(inputs, DECODER_WIDTHS))
        self.head = nn.Sequential(ConvBNReLU(d1, 32), nn.Dropout2d(0.1), nn.Conv2d(32, num_classes, 1))
        self.side = nn.ModuleList(SideOutput(c) for c in (d2, d3, d4, d5))  # at 1/2, 1/4, 1/8, 1/16
        self.global_context = GlobalContext(e5)
        self.select = nn.ModuleList(AdaptiveSelection(d, i) for d, i in zip((d5, d4, d3, d2), inputs[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"acsnet needs inputs of at least {MIN_SIZE} px (its non-local blocks pool the 1/32 map "
                             f"2 x 2), got {tuple(x.shape[-2:])}")
        encoder = self.encoder
        e1 = encoder.relu(encoder.bn1(encoder.conv1(x)))
        e2 = encoder.layer1(encoder.maxpool(e1))
        e3 = encoder.layer2(e2)
        e4 = encoder.layer3(e3)
        e5 = encoder.layer4(e4)
        skips = [e4, e3, e2, e1]
        contexts = self.global_context(e5, [s.shape[-2:] for s in skips])
        decoded, sides = self.decoder[0](e5), []
        for level, (skip, context) in enumerate(zip(skips, contexts)):
            side = self.side[3 - level](decoded)
            sides.append(side)
            selected = self.select[level](local_context_attention(skip, side), decoded, context)
            decoded = self.decoder[level + 1](selected)
        main = self.head(decoded)
        if not self.training:
            return main
        return [main, *reversed(sides)]
