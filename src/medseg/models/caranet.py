"""CaraNet (Lou, Guan & Loew, "CaraNet: Context Axial Reverse Attention Network for Segmentation of Small Medical
Objects", SPIE Medical Imaging 2022, arXiv:2108.07368), a baseline of STS-Net's Table 1 (Sci. Rep. 2025, "CaraNet",
46.64 M parameters), pinned down from the paper (Sec. 2, Fig. 1) and the authors' code (AngeLouCN/CaraNet: CaraNet.py,
lib/context_module.py, lib/axial_atten.py, lib/self_attention.py, lib/partial_decoder.py, lib/conv_layer.py, Train.py,
utils/dataloader.py).

- Encoder (code `res2net101_v1b_26w_4s`): Res2Net-101-v1b = timm `res2net101d` (deep stem, average-pool
  shortcuts; same parameter count as the code's backbone); f3, f4, f5 = layer2..layer4 (512/1024/2048 ch).
  `encoder_weights: PATH` loads a local timm res2net101d checkpoint (nothing is downloaded).
- Conv unit (code `Conv`): conv without bias, optionally followed by BN (eps 1e-3) + PReLU (code `BNPReLU`).
- Reduction (code `rfb*_1`): a 3x3 conv + BN + PReLU per level to 32 channels (despite its name, not PraNet's RFB).
- Partial decoder (code `aggregation`): PraNet's, with bare convs (no BN, no activation) and a biased 1x1 output,
  giving the global map at 1/8.
- Context module (paper Sec. 2.2, code `CFPModule`, the CFP of CFPNet with d = 8): BN-PReLU, a 3x3 conv to C/4,
  four branches of three grouped 3x3 convs (C/16, C/16, C/8 channels; dilation 1, 3, 5, 9), each branch's three
  outputs concatenated, the branches summed hierarchically (b1, b1+b2, b1+b2+b3, ...) and concatenated, BN-PReLU,
  a 1x1 conv, plus the input.
- Axial reverse attention (paper Sec. 2.3, code `AA_kernel` + the `ra*_conv*` stacks): the context feature goes
  through a 1x1 and a 3x3 conv and two sigmoid self-attentions (1x1 query / key to C/8, value to C, a learned gamma
  starting at 0, residual), then is weighted by 1 - sigmoid(the coarser map); three 3x3 conv + BN + PReLU (the last
  to one channel) give the residual added to the coarser map. The code's "height" attention reshapes the
  (C, H, W) tensor to (C*W, H) with a plain `view` (no transpose), which does not isolate the H axis as the paper's
  Fig. 2 describes; kept as the code does it, since the published numbers come from it.
- Deep supervision (code Train.py): the four maps (the finest reverse-attention output first, then 1/16, 1/32, and
  the global map), each upsampled to the input, all weighted 1 with the structure loss. In training mode `forward`
  returns that list; in eval mode the finest map only (the code's Test.py uses it).

Binary only (one sigmoid map, as in the code), so `num_classes` must be 1.

Parameters (3 in, 1 out): 44,593,560 = the reference code's 46,642,560 (counted on CaraNet.py `caranet()`; STS-Net
Table 1 reports this "46.64" M) less its Res2Net ImageNet classifier `resnet.fc` (2,049,000), which CaraNet builds but
never calls. Inputs: any multiple of 32.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

ENCODER = "res2net101d"
WIDTH = 32
CONTEXT_DILATION = 8  # code: CFPModule(32, d=8)


class BNPReLU(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(nn.BatchNorm2d(channels, eps=1e-3), nn.PReLU(channels))


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, groups: int = 1,
         bn_prelu: bool = False) -> nn.Module:
    """The code's `Conv`: a conv without bias ('same' padding), optionally followed by BN + PReLU."""
    layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size - 1) // 2,
                      dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(layer, BNPReLU(out_channels)) if bn_prelu else layer


class PartialDecoder(nn.Module):
    """PraNet's aggregation with bare convs: f5', f4', f3' (each 32 ch) -> the global map at 1/8."""

    def __init__(self, width: int):
        super().__init__()
        self.up5_to4, self.up5_to3, self.up4_to3 = conv(width, width), conv(width, width), conv(width, width)
        self.up5_concat, self.up45_concat = conv(width, width), conv(2 * width, 2 * width)
        self.concat4, self.concat3 = conv(2 * width, 2 * width), conv(3 * width, 3 * width)
        self.out_conv = conv(3 * width, 3 * width)
        self.out = nn.Conv2d(3 * width, 1, 1)

    def forward(self, f5: torch.Tensor, f4: torch.Tensor, f3: torch.Tensor) -> torch.Tensor:
        f5_at4, f4_at3 = _up(f5, f4), _up(f4, f3)
        f4_mixed = self.up5_to4(f5_at4) * f4
        f3_mixed = self.up5_to3(_up(f5_at4, f3)) * self.up4_to3(f4_at3) * f3
        f4_mixed = self.concat4(torch.cat([f4_mixed, self.up5_concat(f5_at4)], dim=1))
        f3_mixed = self.concat3(torch.cat([f3_mixed, self.up45_concat(_up(f4_mixed, f3))], dim=1))
        return self.out(self.out_conv(f3_mixed))


class ContextModule(nn.Module):
    """CFP (paper Sec. 2.2): four dilated grouped-conv branches summed hierarchically, a 1x1 fusion, a residual."""

    def __init__(self, channels: int, d: int):
        super().__init__()
        quarter, sixteenth, eighth = channels // 4, channels // 16, channels // 8
        self.pre = BNPReLU(channels)
        self.reduce = conv(channels, quarter, 3, bn_prelu=True)
        self.branches = nn.ModuleList()
        for dilation in (1, d // 4 + 1, d // 2 + 1, d + 1):  # code: 1, int(d/4+1), int(d/2+1), d+1
            self.branches.append(nn.ModuleList([
                conv(quarter, sixteenth, 3, dilation, sixteenth, bn_prelu=True),
                conv(sixteenth, sixteenth, 3, dilation, sixteenth, bn_prelu=True),
                conv(sixteenth, eighth, 3, dilation, sixteenth, bn_prelu=True)]))
        self.post = BNPReLU(channels)
        self.fuse = conv(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reduced = self.reduce(self.pre(x))
        summed, outputs = None, []
        for branch in self.branches:
            steps, y = [], reduced
            for layer in branch:
                y = layer(y)
                steps.append(y)
            branch_out = torch.cat(steps, dim=1)
            summed = branch_out if summed is None else summed + branch_out
            outputs.append(summed)
        return self.fuse(self.post(torch.cat(outputs, dim=1))) + x


class AxialSelfAttention(nn.Module):
    """The code's `self_attn`: sigmoid attention over one axis, gamma-weighted residual (gamma starts at 0)."""

    def __init__(self, channels: int, axis: str):
        super().__init__()
        self.axis = axis
        self.query, self.key = conv(channels, channels // 8, 1), conv(channels, channels // 8, 1)
        self.value = conv(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        length = height if self.axis == "h" else width
        # a plain reshape to (B, -1, length), as the code's `view` (see the module docstring for the "h" axis)
        query = self.query(x).reshape(batch, -1, length).transpose(1, 2)
        attention = torch.sigmoid(torch.bmm(query, self.key(x).reshape(batch, -1, length)))
        out = torch.bmm(self.value(x).reshape(batch, -1, length), attention.transpose(1, 2))
        return self.gamma * out.reshape(batch, channels, height, width) + x


class AxialReverseAttention(nn.Module):
    """A-RA (paper Sec. 2.3): axial attention on the context feature, weighted by 1 - sigmoid(coarser map),
    three conv + BN + PReLU to a residual added to the coarser map."""

    def __init__(self, width: int):
        super().__init__()
        self.axial = nn.Sequential(conv(width, width, 1), conv(width, width, 3), AxialSelfAttention(width, "h"),
                                   AxialSelfAttention(width, "w"))
        self.residual = nn.Sequential(conv(width, width, 3, bn_prelu=True), conv(width, width, 3, bn_prelu=True),
                                      conv(width, 1, 3, bn_prelu=True))

    def forward(self, context: torch.Tensor, coarser: torch.Tensor) -> torch.Tensor:
        attended = (1 - torch.sigmoid(coarser)) * self.axial(context)
        return self.residual(attended) + coarser


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # the partial decoder's nn.Upsample(scale_factor=2, bilinear, align_corners=True)
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=True)


def _resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


RES2NET101 = EncoderCard(family="timm", name=ENCODER, module="encoder", first_conv="conv1.0.weight")
CARD = NetworkCard(
    paper="Lou, Guan & Loew, CaraNet: Context Axial Reverse Attention Network for Segmentation of Small Medical "
          "Objects, SPIE Medical Imaging 2022",
    size_multiple=32, default_size=352, encoder=RES2NET101,
    paper_weights="an ImageNet Res2Net-101-v1b (the authors' code loads res2net101_v1b_26w_4s)")


@register_model("caranet", CARD)
class CaraNet(SegmentationNetwork):
    """CaraNet: Res2Net-101 encoder, partial decoder, CFP context modules and axial reverse attention (deep sup.)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"caranet is binary only (its reverse attention reads one foreground map), got "
                              f"num_classes={num_classes}; set model.num_classes: 1")
        self.encoder = timm.create_model(ENCODER, pretrained=False, features_only=True, out_indices=(2, 3, 4),
                                         in_chans=in_channels)
        self.reduce = nn.ModuleList(conv(c, WIDTH, 3, bn_prelu=True) for c in self.encoder.feature_info.channels())
        self.decoder = PartialDecoder(WIDTH)
        self.context = nn.ModuleList(ContextModule(WIDTH, CONTEXT_DILATION) for _ in range(3))  # f3, f4, f5
        self.reverse = nn.ModuleList(AxialReverseAttention(WIDTH) for _ in range(3))  # f3, f4, f5

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        f3, f4, f5 = (reduce(f) for reduce, f in zip(self.reduce, self.encoder(x)))
        global_map = self.decoder(f5, f4, f3)
        maps, coarser = [], global_map
        for level in (2, 1, 0):  # f5, f4, f3: deepest first
            features = (f3, f4, f5)[level]
            coarser = self.reverse[level](self.context[level](features), _resize(coarser, features.shape[-2:]))
            maps.append(coarser)
        s5, s4, s3 = (_resize(m, x.shape[-2:]) for m in maps)
        if not self.training:
            return s3
        return [s3, s4, s5, _resize(global_map, x.shape[-2:])]
