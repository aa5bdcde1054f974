"""PraNet (Fan et al., "PraNet: Parallel Reverse Attention Network for Polyp Segmentation", MICCAI 2020,
arXiv:2006.11392), a baseline of M2SNet's polyp tables (arXiv:2303.10894, Tables 1-2), pinned down from the paper (Sec.
2, Fig. 2) and the authors' code (DengPingFan/PraNet: lib/PraNet_Res2Net.py, MyTrain.py).

- Encoder (paper Sec. 2.1; code `res2net50_v1b_26w_4s`): Res2Net-50-v1b = timm `res2net50d` (deep stem, average-pool
  shortcuts), the same layout as M2SNet's encoder; f3, f4, f5 = layer2..layer4 (512/1024/2048 ch at 1/8, 1/16,
  1/32). `encoder_weights: PATH` loads a local timm res2net50d checkpoint (nothing is downloaded).
- Receptive field blocks (code `RFB_modified`): four branches (1x1; 1x1 -> 1xk -> kx1 -> 3x3 dilated k for
  k = 3, 5, 7), concatenated, a 3x3 fusion, plus a 1x1 shortcut, then ReLU; 32 channels.
- Parallel partial decoder (paper Eq. 1, code `aggregation`): products of upsampled deeper features with the
  shallower ones, two concatenate-and-convolve steps, a 3x3 and a 1x1 conv to the global map S_g at 1/8.
- Reverse attention (paper Eq. 2-3): at each of f5, f4, f3 (deepest first) the map from the level above is
  resized to it, the features are weighted by 1 - sigmoid(map), a small conv stack (f5: 1x1 to 256, three 5x5;
  f4, f3: 1x1 to 64, two 3x3) gives a residual that is added to the map.
- The code's conv unit `BasicConv2d` is conv (no bias) + BN: its ReLU is defined but never applied; the code applies
  ReLU only after the RFB sum and between the reverse-attention convs. Kept as in the code.
- Deep supervision (paper Eq. 4, code MyTrain.py): the four maps (S_g and the three reverse-attention outputs), each
  upsampled to the input, are all supervised by the structure loss with weight 1. In training mode `forward`
  returns [S_3, S_4, S_5, S_g] (the test output S_3 first); in eval mode S_3 only.

Binary only: reverse attention reads one foreground map (the paper and code segment polyps with one sigmoid
channel), so `num_classes` must be 1.

Parameters (3 in, 1 out): 30,498,319 = the reference code's 32,547,319 (counted on lib/PraNet_Res2Net.py) less its
Res2Net ImageNet classifier `resnet.fc` (2048 x 1000 + 1000 = 2,049,000), which PraNet builds but never calls.
Inputs: any multiple of 32.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

ENCODER = "res2net50d"
RFB_WIDTH = 32


class ConvBN(nn.Sequential):
    """conv (no bias) + BN: the reference code's `BasicConv2d` as it actually runs (no activation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 1,
                 dilation: int = 1):
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (dilation * (k[0] - 1) // 2, dilation * (k[1] - 1) // 2)
        super().__init__(nn.Conv2d(in_channels, out_channels, k, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels))


class ReceptiveFieldBlock(nn.Module):
    """RFB: a 1x1 branch and three asymmetric-conv + dilated-conv branches (k = 3, 5, 7), fused, plus a shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        branches = [nn.Sequential(ConvBN(in_channels, out_channels))]
        for k in (3, 5, 7):
            branches.append(nn.Sequential(ConvBN(in_channels, out_channels), ConvBN(out_channels, out_channels, (1, k)),
                                          ConvBN(out_channels, out_channels, (k, 1)),
                                          ConvBN(out_channels, out_channels, 3, dilation=k)))
        self.branches = nn.ModuleList(branches)
        self.fuse = ConvBN(4 * out_channels, out_channels, 3)
        self.shortcut = ConvBN(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1))
        return torch.relu(fused + self.shortcut(x))


class PartialDecoder(nn.Module):
    """The parallel partial decoder (paper Eq. 1): aggregates f5', f4', f3' into the global map S_g at 1/8."""

    def __init__(self, width: int):
        super().__init__()
        self.up5_to4 = ConvBN(width, width, 3)
        self.up5_to3 = ConvBN(width, width, 3)
        self.up4_to3 = ConvBN(width, width, 3)
        self.up5_concat = ConvBN(width, width, 3)
        self.up45_concat = ConvBN(2 * width, 2 * width, 3)
        self.concat4 = ConvBN(2 * width, 2 * width, 3)
        self.concat3 = ConvBN(3 * width, 3 * width, 3)
        self.out_conv = ConvBN(3 * width, 3 * width, 3)
        self.out = nn.Conv2d(3 * width, 1, 1)

    def forward(self, f5: torch.Tensor, f4: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
        f5_at4, f5_at3, f4_at3 = _up2(f5, f4), _up2(_up2(f5, f4), f3), _up2(f4, f3)
        f4_mixed = self.up5_to4(f5_at4) * f4
        f3_mixed = self.up5_to3(f5_at3) * self.up4_to3(f4_at3) * f3
        f4_mixed = self.concat4(torch.cat([f4_mixed, self.up5_concat(f5_at4)], dim=1))
        f3_mixed = self.concat3(torch.cat([f3_mixed, self.up45_concat(_up2(f4_mixed, f3))], dim=1))
        return self.out(self.out_conv(f3_mixed))


class ReverseAttention(nn.Module):
    """RA (paper Eq. 2-3): weight features by 1 - sigmoid(the coarser map), add the conv stack's residual to it."""

    def __init__(self, in_channels: int, width: int, kernel_size: int, inner_convs: int, out_kernel_size: int):
        super().__init__()
        self.reduce = ConvBN(in_channels, width)
        self.inner = nn.ModuleList(ConvBN(width, width, kernel_size) for _ in range(inner_convs))
        self.out = ConvBN(width, 1, out_kernel_size)

    def forward(self, features: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        reverse = 1 - torch.sigmoid(coarser)
        x = self.reduce(features * reverse)
        for conv in self.inner:
            x = torch.relu(conv(x))
        return self.out(x) + coarser


def _up2(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # the partial decoder's nn.Upsample(scale_factor=2, bilinear, align_corners=True)
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


RES2NET50 = EncoderCard(family="timm", name=ENCODER, module="encoder", first_conv="conv1.0.weight")
CARD = NetworkCard(
    paper="Fan et al., PraNet: Parallel Reverse Attention Network for Polyp Segmentation, MICCAI 2020",
    size_multiple=32, default_size=352, encoder=RES2NET50,
    paper_weights="an ImageNet Res2Net-50-v1b (the authors' code loads res2net50_v1b_26w_4s)")


@register_model("pranet", CARD)
class PraNet(SegmentationNetwork):
    """PraNet: Res2Net-50 encoder, RFBs, parallel partial decoder, three reverse-attention stages (deep sup.)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"pranet is binary only (its reverse attention reads one foreground map), got "
                              f"num_classes={num_classes}; set model.num_classes: 1")
        self.encoder = timm.create_model(ENCODER, pretrained=False, features_only=True, out_indices=(2, 3, 4),
                                         in_chans=in_channels)
        channels = self.encoder.feature_info.channels()  # 512, 1024, 2048
        self.rfb = nn.ModuleList(ReceptiveFieldBlock(c, RFB_WIDTH) for c in channels)
        self.decoder = PartialDecoder(RFB_WIDTH)
        # f5: 1x1 to 256, three 5x5, 1x1 out; f4 and f3: 1x1 to 64, two 3x3, 3x3 out (reference code)
        self.reverse = nn.ModuleList([ReverseAttention(channels[2], 256, 5, 3, 1),
                                      ReverseAttention(channels[1], 64, 3, 2, 3),
                                      ReverseAttention(channels[0], 64, 3, 2, 3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        f3, f4, f5 = self.encoder(x)
        global_map = self.decoder(self.rfb[2](f5), self.rfb[1](f4), self.rfb[0](f3))
        maps, coarser = [], global_map
        for attention, features in zip(self.reverse, (f5, f4, f3)):
            coarser = attention(features, _resize(coarser, features.shape[-2:]))
            maps.append(coarser)
        s5, s4, s3 = (_resize(m, x.shape[-2:]) for m in maps)
        if not self.training:
            return s3
        return [s3, s4, s5, _resize(global_map, x.shape[-2:])]
