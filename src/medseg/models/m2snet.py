"""M2SNet and MSNet (Zhao et al., "M2SNet: Multi-scale in Multi-scale Subtraction Network for Medical Image
Segmentation", arXiv:2303.10894; MSNet: Zhao et al., MICCAI 2021), pinned down from the paper and the
authors' code (Xiaoqi-Zhao-DLUT/MSNet-M2SNet: model/miccai_msnet.py, model/res2net.py).

- Encoder (paper Sec. 4.3; the authors' model/res2net.py): Res2Net-50-v1b-26w-4s = timm `res2net50d`, features x1 =
  MaxPool(3, 2, 1) of the stem (64 ch, 1/4), x2..x5 = layer1..layer4 (256/512/1024/2048 ch at 1/4, 1/8, 1/16, 1/32).
  `encoder_weights: PATH` loads a local timm res2net50d checkpoint (nothing is downloaded; the full model's or the
  features_only one's, the fc unused) through `medseg.models.pretrained`; for 1-channel inputs its first conv
  `conv1.0` is adapted with timm's adapt_input_conv (the sum over RGB).
- Channel reduction (the authors' code): d_k = CBR_{->64}(x_k) for k = 2..5 (CBR = 3x3 conv with bias, BN, ReLU); x1
  is used as it is.
- Subtraction unit (paper Eq. 1-2, the authors' code):
  MSU(A, B) = CBR(|A - B| + |Phi3(A) - Phi3(B)| + |Phi5(A) - Phi5(B)|), A (deeper) bilinearly upsampled to B.
  Phi_k = ReLU(BN_k(conv with a fixed all-ones 64x64xkxk filter, zero padding)): a full cross-channel regional
  sum. The all-ones filters are non-persistent buffers: no parameters, no gradient, not in the saved weights.
  Phi3 and Phi5 are ONE shared pair for the whole network (their BN statistics are shared by every unit), as in
  the authors' code. MSNet keeps only |A - B|.
- Inter-layer pyramid (paper Eq. 3, Fig. 2): 10 units in four orders, then the complementarity-enhanced features
  CE4 = S54, CE3 = CBR(S43 + S543), CE2 = CBR(S32 + S432 + S5432), CE1 = CBR(S21 + S321 + S4321 + S54321), where
  S54321 = MSU(CBR(S5432), S4321).
- Decoder (the authors' code): P5 = CBR_{2048->64}(x5); O4 = CBR(up(P5) + CE4); O3 = CBR(up(O4) + CE3); O2 =
  CBR(up(O3) + CE2); O1 = conv3x3_{64->C}(up(O2) + CE1) at 1/4; logits = bilinear x4.

Parameters (3 in, 1 out): M2SNet 27,692,585, MSNet 27,692,329 (backbone 23,669,352 + head), which is
the paper's Table 6 "27.7" (its "MB" column counts millions of parameters). Inputs: any multiple of 32.

Ablations of Table 7 (Sec. 4.5.1), as options of both names (the defaults build the networks above):
- `orders` = n in 0..4 keeps the pyramid's units of order <= n (order = levels spanned - 1: S54..S21 are order 1,
  S54321 order 4) and sums only those into CE_k; `orders: 0` is the FPN baseline, CE4..CE1 = d4, d3, d2, x1 (no units).
  The paper's rows add CE terms order by order from the FPN baseline up to the full pyramid, then LossNet (a loss
  term of the recipe); which CBRs stay in the partial pyramids is ours (every CE_k keeps its CBR, S5432's extra CBR
  exists only with order 4), as the released code has only the full network.
- `unit: addition` replaces |A - B| by A + B in every unit (Table 7's "AU"), with the same parameters, as the paper
  says ("no additional parameters are introduced").
Table 8's ASPP / DenseASPP subtraction units (Fig. 7) are not built: the paper gives their parameter totals (29.2M,
29.6M) but not their dilation rates, widths or which convolutions A and B share.

Multi-class (paper Sec. 1 and 4.1: GOALS' three OCT layers; the released code is binary only): `num_classes` = C
> 1 changes only the output conv to C channels, read with a softmax over background and the C - 1 classes
(recipes/m2snet_goals.yaml; the per-class losses are in medseg.losses.m2snet).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.blocks import ConvBNReLU
from medseg.models.registry import register_model

WIDTH = 64
ENCODER = "res2net50d"


class AllOnesRegionalSum(nn.Module):
    """Phi_k: a fixed all-ones k x k cross-channel filter (never trained, never saved), then BN and ReLU."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.register_buffer("ones", torch.ones(channels, channels, kernel, kernel), persistent=False)
        self.padding = kernel // 2
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(F.conv2d(x, self.ones.to(x.dtype), padding=self.padding)))


class SubtractionUnit(nn.Module):
    """MSU (or MSNet's single-scale SU when no regional filters are given): CBR of summed |differences|.
    `addition=True` is Table 7's addition unit (AU): the same unit with A + B in place of |A - B|."""

    def __init__(self, addition: bool = False):
        super().__init__()
        self.fuse = ConvBNReLU(WIDTH, WIDTH, bias=True)
        self.addition = addition

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.addition else (a - b).abs()

    def forward(self, deeper: torch.Tensor, shallower: torch.Tensor, regional: list[nn.Module]) -> torch.Tensor:
        deeper = F.interpolate(deeper, size=shallower.shape[-2:], mode="bilinear", align_corners=False)
        difference = self.combine(deeper, shallower)
        for phi in regional:
            difference = difference + self.combine(phi(deeper), phi(shallower))
        return self.fuse(difference)


# The ten units of the pyramid: name -> (deeper input, shallower input), in dependency order.
PYRAMID = {
    "s54": ("d5", "d4"), "s43": ("d4", "d3"), "s32": ("d3", "d2"), "s21": ("d2", "x1"),
    "s543": ("s54", "s43"), "s432": ("s43", "s32"), "s321": ("s32", "s21"),
    "s5432": ("s543", "s432"), "s4321": ("s432", "s321"),
    "s54321": ("s5432_reduced", "s4321"),
}
# The complementarity-enhanced features (Eq. 3) and the units summed into each, lowest order first; a unit's order
# is the number of levels it spans minus one (Table 7 adds the orders one by one).
ENHANCED = {"ce3": ("s43", "s543"), "ce2": ("s32", "s432", "s5432"), "ce1": ("s21", "s321", "s4321", "s54321")}
UNIT_ORDER = {name: len(name) - 2 for name in PYRAMID}
FPN_SKIPS = {"ce4": "d4", "ce3": "d3", "ce2": "d2", "ce1": "x1"}  # orders = 0: the reduced features themselves


class SubtractionNetwork(SegmentationNetwork):
    def __init__(self, in_channels: int = 3, num_classes: int = 1, multi_scale: bool = True, orders: int = 4,
                 unit: str = "subtraction"):
        super().__init__()
        if orders not in range(5) or unit not in ("subtraction", "addition"):
            raise MedsegError(f"orders must be 0-4 and unit 'subtraction' or 'addition' (Table 7 ablations), got "
                              f"orders={orders!r}, unit={unit!r}")
        self.orders = orders
        self.encoder = timm.create_model(ENCODER, pretrained=False, features_only=True, in_chans=in_channels)
        self.stem_pool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = self.encoder.feature_info.channels()  # 64, 256, 512, 1024, 2048
        self.reduce = nn.ModuleDict({f"d{k}": ConvBNReLU(channels[k - 1], WIDTH, bias=True) for k in (2, 3, 4, 5)})
        self.regional = (nn.ModuleList([AllOnesRegionalSum(WIDTH, 3), AllOnesRegionalSum(WIDTH, 5)])
                         if multi_scale and orders else nn.ModuleList())  # the FPN baseline has no units to use them
        self.units = nn.ModuleDict({name: SubtractionUnit(addition=unit == "addition") for name in PYRAMID
                                    if UNIT_ORDER[name] <= orders})
        if orders == 4:
            self.s5432_reduce = ConvBNReLU(WIDTH, WIDTH, bias=True)
        self.enhance = nn.ModuleDict({name: ConvBNReLU(WIDTH, WIDTH, bias=True) for name in ENHANCED if orders})
        self.p5 = ConvBNReLU(channels[4], WIDTH, bias=True)
        self.decode = nn.ModuleDict({name: ConvBNReLU(WIDTH, WIDTH, bias=True) for name in ("o4", "o3", "o2")})
        self.head = nn.Conv2d(WIDTH, num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem, *stages = self.encoder(x)
        f = {"x1": self.stem_pool(stem), **{f"d{k}": self.reduce[f"d{k}"](stages[k - 2]) for k in (2, 3, 4, 5)}}
        regional = list(self.regional)
        for name, (deeper, shallower) in PYRAMID.items():
            if name not in self.units:
                continue
            if name == "s54321":
                f["s5432_reduced"] = self.s5432_reduce(f["s5432"])
            f[name] = self.units[name](f[deeper], f[shallower], regional)
        if self.orders:
            ce4 = f["s54"]
            ce3, ce2, ce1 = (self.enhance[ce](sum(f[u] for u in units if u in self.units))
                             for ce, units in ENHANCED.items())
        else:
            ce4, ce3, ce2, ce1 = (f[skip] for skip in FPN_SKIPS.values())
        out = self.p5(stages[3])
        for name, skip in (("o4", ce4), ("o3", ce3), ("o2", ce2)):
            out = self.decode[name](_up(out, skip) + skip)
        out = self.head(_up(out, ce1) + ce1)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


PAPER_WEIGHTS = "an ImageNet Res2Net-50-v1b (the authors' code loads res2net50_v1b_26w_4s)"
RES2NET50 = EncoderCard(family="timm", name=ENCODER, module="encoder", first_conv="conv1.0.weight")
M2SNET = NetworkCard(
    paper="Zhao et al., M2SNet: Multi-scale in Multi-scale Subtraction Network for Medical Image Segmentation, "
          "arXiv:2303.10894, 2023",
    size_multiple=32, default_size=352, encoder=RES2NET50, paper_weights=PAPER_WEIGHTS)
MSNET = NetworkCard(
    paper="Zhao et al., Automatic Polyp Segmentation via Multi-scale Subtraction Network, MICCAI 2021",
    size_multiple=32, default_size=352, encoder=RES2NET50, paper_weights=PAPER_WEIGHTS)


@register_model("m2snet", M2SNET, multi_scale=True)
@register_model("msnet", MSNET, multi_scale=False)
class M2SNet(SubtractionNetwork):
    """Res2Net-50 encoder + multi-scale subtraction pyramid; `msnet` uses single-scale |A - B| units."""
