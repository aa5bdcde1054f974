"""U-Net, UNet++ and Attention U-Net on a Res2Net-50 encoder: the "medicine-general" baselines of M2SNet's Tables 1-4
(Zhao et al., arXiv:2303.10894), whose Backbone column says "R2-50" for each.

What M2SNet says about them (Sec. 4.4): "Based on the open-source codes, we retrain these medicine-general methods on
the same training sets as our models"; nothing else: no decoder widths, no code, no recipe. So each is a
segmentation_models_pytorch composition (ours) on the encoder M2SNet itself uses (the authors' code loads
res2net50_v1b_26w_4s = timm `res2net50d`, smp `tu-res2net50d`):
- `unet_res2net50`: smp Unet (Ronneberger et al. 2015's decoder with smp's defaults: widths 256-128-64-32-16,
  nearest x2 upsampling, two 3x3 conv-BN-ReLU per level, a 3x3 output conv at full size);
- `unetpp_res2net50`: smp UnetPlusPlus (Zhou et al. 2019's nested dense skips, smp's defaults, no deep supervision);
- `attention_unet_res2net50`: the same Unet with an additive attention gate (Oktay et al. 2018, Eq. 1-2; medseg's
  `AttentionGate`, intermediate width = skip channels / 2 as in the widely used reference implementation) on every
  skip, gated by the upsampled decoder feature before the two are concatenated.
`encoder_weights: PATH` loads a local timm res2net50d checkpoint (m2snet's file) into `network.encoder.model`.

Parameter counts cannot be pinned to M2SNet: its Table 6 gives U-Net ~7.2M, U-Net++ ~19.2M and Attention U-Net ~12.6M
"parameters (MB)", yet its README calls them "comparisons under the Res2Net-50 backbone", whose encoder alone has
23,669,352. The tests pin the compositions' own counts (3 in, 1 out): 32,682,425 / 49,147,065 / 34,511,653.
Inputs: any multiple of 32.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, Gated, NetworkCard, SegmentationNetwork
from medseg.models.blocks import AttentionGate
from medseg.models.registry import register_model

ENCODER = "res2net50d"
ARCHITECTURES = {"unet": smp.Unet, "unetpp": smp.UnetPlusPlus}
DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's default decoder widths (ours: M2SNet gives none)


class GateBeforeConcat(nn.Module):
    """Takes the place of an smp decoder block's `attention1`, which sees cat([upsampled decoder feature, skip]):
    gates the skip by the decoder feature (Attention U-Net) and concatenates again."""

    def __init__(self, decoder_channels: int, skip_channels: int):
        super().__init__()
        self.decoder_channels = decoder_channels
        self.gate = AttentionGate(decoder_channels, skip_channels, skip_channels // 2)

    def forward(self, concatenated: torch.Tensor) -> torch.Tensor:
        decoder, skip = concatenated.split([self.decoder_channels, concatenated.shape[1] - self.decoder_channels], 1)
        return torch.cat([decoder, self.gate(decoder, skip)], dim=1)


class Res2NetUNet(SegmentationNetwork):
    groups = {"encoder": ("network.encoder",)}

    def __init__(self, in_channels: int = 3, num_classes: int = 1, architecture: str = "unet",
                 attention: bool = False):
        super().__init__()
        self.network = ARCHITECTURES[architecture](encoder_name=f"tu-{ENCODER}", encoder_weights=None,
                                                   in_channels=in_channels, classes=num_classes,
                                                   decoder_channels=DECODER_CHANNELS)
        if attention and architecture != "unet":
            raise MedsegError("attention gates are wired into the U-Net decoder only; use architecture='unet'")
        if attention:
            # smp's UnetDecoder: block i takes the previous output (the deepest feature first) and skip i
            deepest, *skips = self.network.encoder.out_channels[1:][::-1]
            block_inputs = [deepest, *DECODER_CHANNELS[:-1]]
            for block, decoder_channels, skip_channels in zip(self.network.decoder.blocks, block_inputs, skips):
                block.attention1 = GateBeforeConcat(decoder_channels, skip_channels)  # the last block has no skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


RES2NET50 = EncoderCard(family="timm", name=ENCODER, module="network.encoder.model", first_conv="conv1.0.weight")
PAPER_WEIGHTS = "an ImageNet Res2Net-50-v1b (M2SNet's R2-50 backbone)"
M2SNET_TABLES = "; as compared in Zhao et al., M2SNet, arXiv:2303.10894 (Tables 1-4, R2-50 backbone)"


def _card(paper: str) -> NetworkCard:
    return NetworkCard(paper=paper + M2SNET_TABLES, size_multiple=32, default_size=352,
                       head="network.segmentation_head", encoder=RES2NET50, paper_weights=PAPER_WEIGHTS)


UNET = _card("Ronneberger, Fischer & Brox, U-Net, MICCAI 2015, on Res2Net-50 via segmentation_models_pytorch")
UNETPP = _card("Zhou et al., UNet++: Redesigning Skip Connections, IEEE TMI 2019, on Res2Net-50 via "
               "segmentation_models_pytorch")
ATTENTION_UNET = _card("Oktay et al., Attention U-Net: Learning Where to Look for the Pancreas, MIDL 2018, on "
                       "Res2Net-50 via segmentation_models_pytorch")


@register_model("unet_res2net50", UNET, architecture="unet", attention=False)
@register_model("unetpp_res2net50", UNETPP, architecture="unetpp", attention=False)
class Res2NetBaseline(Res2NetUNet):
    """U-Net / UNet++ decoders (smp) on a Res2Net-50 encoder: M2SNet's R2-50 baselines."""


@register_model("attention_unet_res2net50", ATTENTION_UNET, architecture="unet", attention=True)
class AttentionRes2NetUNet(Gated, Res2NetUNet):
    """Attention U-Net: smp's U-Net decoder with additive attention gates, on a Res2Net-50 encoder (M2SNet's)."""

    def first_layer_gates(self) -> dict[str, AttentionGate]:
        gates = {name: module.gate for name, module in self.named_modules() if isinstance(module, GateBeforeConcat)}
        return dict(list(gates.items())[-1:])  # the gate on the finest skip (1/2 resolution)
