"""NU-Net (Chen et al., "NU-net: An Unpretentious Nested U-net for Breast Tumor Segmentation", arXiv:2209.07193,
2022), a baseline of M2SNet's breast-ultrasound table (arXiv:2303.10894, Table 4, "Deeper U-Net"), pinned down from the
authors' Keras code (CGPxy/NU-net: model_net.py `deep_unet7`, Train.py).

- Unit (code `ConvBlock`): two 3x3 convs (with bias) + BN + LeakyReLU(0.01).
- Main path: a seven-level U-Net, 64-128-128-256-256-512-512 channels at 1..1/64 and a 1024-channel bottom at 1/128;
  at 1/4, 1/16 and 1/64 the main unit also takes a 32-channel 3x3 conv-BN-LeakyReLU of the level two above it,
  max-pooled 4x4 (concatenated before the unit).
- Nested "sub-U-Nets" sharing weights across depths (the paper's title): from each main level l = 1..6 a side chain
  starts with a 4x4 max pool of that level and descends by 2x2 max pools and units to 1/128; the chains from levels
  1 / 1/2 / 1/4 / 1/8 / 1/16 / 1/32 keep 64 / 128 / 128 / 256 / 256 / 512 channels. All chain ends and the bottom
  are concatenated at 1/128 (2368 channels).
- Decoder (code `updata1`): nearest x2 upsampling, concatenation with the skip, a unit. The skips at 1/32 .. 1 are
  widened by the re-upsampled end of the chain from that level: at 1/32 the 1/128 end nearest x4; at 1/16 .. 1 the
  end brought up by (nearest x2, unit) steps to 1/64 .. 1/4 and a final nearest x4 (the code's `updata*` towers).
- Head: 1x1 conv to one sigmoid map (code); `num_classes` > 1 gives a softmax head instead (ours).

Parameters (3 in, 1 out): 77,052,833, the trainable weights of the code's Keras layers (each Conv2D weight and bias,
each BatchNormalization gamma and beta; Keras' non-trainable moving statistics are buffers here); the paper states no
count. Inputs: any multiple of 128 (the code trains at 384 x 384).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model


def conv_bn_lrelu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.01)]


class Unit(nn.Sequential):
    """The code's ConvBlock: (3x3 conv, BN, LeakyReLU 0.01) x 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(*conv_bn_lrelu(in_channels, out_channels), *conv_bn_lrelu(out_channels, out_channels))


class SideChain(nn.Module):
    """A nested sub-U-Net's descent: 4x4 max pool of a main level, then units every 2x2 pool down to 1/128."""

    def __init__(self, widths: list[tuple[int, int]]):
        super().__init__()
        self.units = nn.ModuleList(Unit(i, o) for i, o in widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = [self.units[0](F.max_pool2d(x, 4))]
        for unit in self.units[1:]:
            outputs.append(unit(F.max_pool2d(outputs[-1], 2)))
        return outputs


class Rise(nn.Module):
    """A `updata` tower: (nearest x2, unit) steps, then nearest x4."""

    def __init__(self, channels: int, steps: int):
        super().__init__()
        self.units = nn.ModuleList(Unit(channels, channels) for _ in range(steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(_up(x, 2))
        return _up(x, 4)


def _up(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="nearest")


CARD = NetworkCard(paper="Chen et al., NU-net: An Unpretentious Nested U-net for Breast Tumor Segmentation, "
                         "arXiv:2209.07193, 2022", size_multiple=128, default_size=384)


@register_model("nunet", CARD)
class NUNet(SegmentationNetwork):
    """NU-Net: a seven-level U-Net with nested weight-sharing sub-U-Net chains and their re-upsampled features."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        # main path (code Conv1 .. Conv8) and the 32-channel 4x4-pooled inputs of levels 3, 5, 7
        self.main = nn.ModuleList([Unit(in_channels, 64), Unit(64, 128), Unit(32 + 128, 128), Unit(128, 256),
                                   Unit(32 + 256, 256), Unit(256, 512), Unit(32 + 512, 512), Unit(512, 1024)])
        self.shortcuts = nn.ModuleList(nn.Sequential(*conv_bn_lrelu(c, 32)) for c in (64, 128, 256))
        # side chains from main levels 1..6 (code Conv31.., Conv41.., Conv51.., Conv61.., Conv71.., Conv81)
        self.chains = nn.ModuleList([
            SideChain([(64, 64)] * 6),
            SideChain([(128, 128)] * 5),
            SideChain([(128, 128)] * 4),
            SideChain([(256, 256)] * 3),
            SideChain([(256, 256)] * 2),
            SideChain([(512, 512)]),
        ])
        # decoder units 1/64 .. 1 (code up1 .. up7): in = skip (+ risen side feature) + the level below
        self.decoder = nn.ModuleList([Unit(512 + 2368, 512), Unit(512 + 512 + 512, 512), Unit(256 + 256 + 512, 256),
                                      Unit(256 + 256 + 256, 256), Unit(128 + 128 + 256, 128),
                                      Unit(128 + 128 + 128, 128), Unit(64 + 64 + 128, 64)])
        # risen side features for the skips at 1/16 .. 1 (code updata2 .. updata10), from the chains' 1/64 levels
        self.rises = nn.ModuleList([Rise(256, 1), Rise(256, 2), Rise(128, 3), Rise(128, 4), Rise(64, 5)])
        self.head = nn.Conv2d(64, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.main
        m1 = main[0](x)
        m2 = main[1](F.max_pool2d(m1, 2))
        m3 = main[2](torch.cat([self.shortcuts[0](F.max_pool2d(m1, 4)), F.max_pool2d(m2, 2)], dim=1))
        m4 = main[3](F.max_pool2d(m3, 2))
        m5 = main[4](torch.cat([self.shortcuts[1](F.max_pool2d(m3, 4)), F.max_pool2d(m4, 2)], dim=1))
        m6 = main[5](F.max_pool2d(m5, 2))
        m7 = main[6](torch.cat([self.shortcuts[2](F.max_pool2d(m5, 4)), F.max_pool2d(m6, 2)], dim=1))
        m8 = main[7](F.max_pool2d(m7, 2))
        # chain from level l starts at 1/2^(l+1); its last output is at 1/128, the one before at 1/64
        chains = [chain(level) for chain, level in zip(self.chains, (m1, m2, m3, m4, m5, m6))]
        bottom = torch.cat([m8] + [c[-1] for c in reversed(chains)], dim=1)  # code order: Conv8, Conv81 .. Conv86
        d = self.decoder[0](torch.cat([m7, _up(bottom, 2)], dim=1))  # 1/64
        d = self.decoder[1](torch.cat([m6, _up(chains[5][-1], 4), _up(d, 2)], dim=1))  # 1/32: Conv81 x4
        skips = (m5, m4, m3, m2, m1)
        risers = (chains[4], chains[3], chains[2], chains[1], chains[0])  # code Conv82 .. Conv86 (their 1/128 ends)
        for unit, rise, skip, chain in zip(self.decoder[2:], self.rises, skips, risers):
            d = unit(torch.cat([skip, rise(chain[-1]), _up(d, 2)], dim=1))
        return self.head(d)
