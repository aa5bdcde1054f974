"""Fovea-UNet (Liu et al., "Fovea-UNet: detection and segmentation of lymph node metastases in colorectal
cancer with deep learning", BioMedical Engineering OnLine 2023); the authors published no code, so where the
paper is silent the choices are ours (marked).

- Encoder, H-GhostNet ("Overall network architecture"): "only one convolution and four bottlenecks ... are
  retained, where each bottleneck contains four H-Ghost convolution layers", F1..F4 the four bottlenecks'
  outputs at 1/2, 1/4, 1/8, 1/8. `encoder: ghostnet_4b` (default): timm `ghostnet_100`'s stem and one
  GhostBottleneck (two Ghost modules = four conv layers, primary + cheap each) per GhostNet stage 1-4, the
  first of each, `blocks` 0, 1, 3, 5: 16, 24, 40, 80 channels, 8 Ghost modules. Ours: which four bottlenecks
  (the paper names none; the first of each stage carries the stage's stride and width, and a ghostnet_100
  file holds every tensor of them). `encoder: ghostnet`: our first reading, stages 1-4 whole (`blocks`
  0-6, 11 bottlenecks, 16, 24, 40, 112 channels, 22 Ghost modules); it contradicts the four layers per
  bottleneck. In both, the stride 2 of `blocks[5][0]` (its depthwise conv and shortcut) is set to 1 to keep
  F4 at 1/8 (timm builds GhostNet for stride 32 only). ImageNet weights only from a local file
  (`encoder_weights`: a timm ghostnet_100 state dict, whose keys `ghost_card(layout).rename` maps to the
  encoder's; the blocks a layout drops, conv_head and the classifier are unused; loaded by
  `medseg.models.pretrained`, the first conv adapted by timm's adapt_input_conv for 1-channel input). With
  `ghostnet_4b`, blocks 3 and 5 then see inputs their pretrained weights never saw (blocks 2, 4 dropped).
- Fovea Pooling ("Fovea pooling", Eq. 3-8) replaces each of the four skip identities: an importance-aware
  module (PSANet collect / distribute attention, Eq. 3-5) yields Z in [0, 1] per pixel, and
  `medseg.models.fovea_pooling.fovea_pool` pools each pixel over a window of side 2r - 1, r = floor(exp(varsigma
  (1 - Z))), up to R = floor(s W) with boundaries s = 1/8, 1/16, 1/8, 1/8 (Fig. 4).
- Decoder: the paper says only that encoder features are concatenated with the decoder output while
  upsampling; our U-Net-style choice: D4 = block(cat[FP4(F4), FP3(F3)]) at 1/8, then bilinear x2
  and concatenation with FP2(F2), FP1(F1), a last block at full size, 1x1 head; blocks are two bias-free
  conv3x3-BN-ReLU; widths (512, 256, 128, 64) by default (`decoder_widths`).
- nHSIC ("H-Ghost backbone" Eq. 10-13, "Loss function") on the primary-conv (intrinsic) outputs of every Ghost
  module, the batch's images as the samples (`medseg.models.nhsic`, where the readings are set out):
  `extra_losses(mask)["nhsic"]`, weighted by the recipe (0.75); every channel pair, as the paper's sum
  (`nhsic_channels` caps the channels per layer; `nhsic_samples: cells` takes 4 x 4 pooled cells of every
  image as the samples instead, the reading that still separates channels at the paper's batch of 4).
  H-GhostNet = a GhostNet layout with nHSIC; plain GhostNet =
  `nhsic: false`.
- Ablations by option: `pooling` (Table 4), `boundaries` (Fig. 4), `encoder: vgg16 | resnet50 |
  mobilenet_v2 | inception_v3` with `nhsic: false` (Table 5; smp encoders, Inception-v3 (the paper's ref. 33)
  through smp's timm-universal encoder, F4 at 1/8).

Other choices where the paper is silent (ours): attention at a working resolution of at most
32 x 32 (bilinear, align_corners=True) with Z upsampled back; Z = sigmoid(1x1 conv of [z_collect,
z_distribute]); soft radius by default; Lp pooling (p = 2) by default.

Size (3 in, 1 out, default decoder; pinned in tests/test_fovea_unet.py): `ghostnet_4b` 5,671,813 parameters
(backbone 36,048, four importance modules 323,444, decoder and head 5,312,321); `ghostnet` 6,436,193 (585,548,
390,868, 5,459,777). The paper reports "23.23 MB". Read as torchsummary's "Params size (MB)" (parameters x 4
bytes / 2^20, the size PyTorch users print; the paper used PyTorch 1.8): 21.64 and 24.55 MB, 6.9 % under and
5.7 % over; read as x 4 / 10^6: 22.69 and 25.74 MB, 2.3 % under and 10.8 % over. Either way the size cannot
choose the encoder: our decoder, whose widths the paper does not give, is 94 % and 85 % of them. The text
can, hence the default `ghostnet_4b`.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, ExtraLosses, NamedFeatureLayers, NetworkCard, SegmentationNetwork
from medseg.models.blocks import ConvBNReLU, DoubleConv
from medseg.models.fovea_pooling import AGGREGATIONS, FoveaPooling, fovea_max_radius
from medseg.models.nhsic import SAMPLES as NHSIC_SAMPLES
from medseg.models.nhsic import nhsic_penalty
from medseg.models.pretrained import smp_encoder_card
from medseg.models.registry import register_model

BOUNDARIES = (1 / 8, 1 / 16, 1 / 8, 1 / 8)  # paper Fig. 4: per-stage pooling boundaries s


def psa_gather_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(HW, HW) long: entry [p, q] is the channel of PSANet's over-complete map at position p = (k, l) that
    holds the weight between p and q = (s, t): (H - 1 - k + s)(2W - 1) + (W - 1 - l + t) (paper Eq. 4-5)."""
    p_row, p_col = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                  indexing="ij")
    p_row, p_col = p_row.reshape(-1, 1), p_col.reshape(-1, 1)
    q_row, q_col = p_row.reshape(1, -1), p_col.reshape(1, -1)
    return (height - 1 - p_row + q_row) * (2 * width - 1) + (width - 1 - p_col + q_col)


class PSABranch(nn.Module):
    """One PSANet branch: reduce to C/4, over-complete map of (2h - 1)(2w - 1) channels, PSA mask, softmax
    over the sources, aggregation of the reduced features (`collect` or `distribute`)."""

    def __init__(self, channels: int, reduced: int, size: int, mode: str):
        super().__init__()
        self.mode, self.size = mode, size
        self.reduce = ConvBNReLU(channels, reduced, 1)
        self.mask_head = nn.Sequential(ConvBNReLU(reduced, reduced, 1),
                                       nn.Conv2d(reduced, (2 * size - 1) ** 2, 1, bias=False))
        self.register_buffer("index", psa_gather_index(size, size), persistent=False)  # fixed: built once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=True)
        batch, channels, height, width = x.shape
        over_complete = self.mask_head(x).flatten(2).transpose(1, 2)  # (B, HW positions, (2P-1)^2)
        # [b, p, q] = weight between position p and q, read at p
        weights = over_complete.gather(2, self.index.expand(batch, -1, -1))
        # (B, sources, targets): collect reads the weight at the target, distribute at the source
        attention = weights.transpose(1, 2) if self.mode == "collect" else weights
        attention = attention.softmax(dim=1)
        return torch.bmm(x.flatten(2), attention).view(batch, channels, height, width)


class ImportanceModule(nn.Module):
    """Z = sigmoid(1x1 conv([collect, distribute])) at a working size of at most `size`, upsampled to the stage."""

    def __init__(self, channels: int, size: int = 32):
        super().__init__()
        reduced = max(1, channels // 4)
        self.collect = PSABranch(channels, reduced, size, "collect")
        self.distribute = PSABranch(channels, reduced, size, "distribute")
        self.score = nn.Conv2d(2 * reduced, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.score(torch.cat([self.collect(x), self.distribute(x)], dim=1))
        return torch.sigmoid(F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=True))


class FoveaSkip(nn.Module):
    """A skip connection through Fovea Pooling: importance map, then variable-radius pooling."""

    def __init__(self, channels: int, boundary: float, size: int, aggregation: str, hard: bool):
        super().__init__()
        self.importance = ImportanceModule(channels, size)
        self.pool = FoveaPooling(boundary, aggregation, hard)
        self.last_importance: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # identity ablation, or a map so small that R = floor(s W) = 1: every window is the pixel itself
        if self.pool.aggregation == "identity" or fovea_max_radius(self.pool.boundary, x.shape[-1]) == 1:
            return x
        importance = self.importance(x)
        self.last_importance = importance.detach()
        return self.pool(x, importance)


GHOST_LAYOUTS = {  # encoder option -> the ghostnet_100 `blocks` indices that make F1..F4 (one group each)
    "ghostnet_4b": ((0,), (1,), (3,), (5,)),  # the paper's one conv + four bottlenecks: the first of stages 1-4
    "ghostnet": ((0,), (1, 2), (3, 4), (5, 6)),  # stages 1-4 whole: 11 bottlenecks (our first reading)
}
ENCODER_CHANNELS = {"ghostnet_4b": (16, 24, 40, 80), "ghostnet": (16, 24, 40, 112)}


class HGhostNet(nn.Module):
    """timm ghostnet_100's stem and the `blocks` of one of GHOST_LAYOUTS, outputs F1..F4 at 1/2, 1/4, 1/8, 1/8.
    blocks[5][0] (the first bottleneck of stage 4, in both layouts) loses its stride 2 to keep F4 at 1/8. Blocks
    not in the layout are dropped; module names are the same in both layouts (stage k > 0 a Sequential)."""

    def __init__(self, in_channels: int = 3, layout: str = "ghostnet_4b"):
        super().__init__()
        net = timm.create_model("ghostnet_100", pretrained=False, in_chans=in_channels)
        self.stem = nn.Sequential(net.conv_stem, net.bn1, net.act1)
        (first,), *later = GHOST_LAYOUTS[layout]
        self.stages = nn.ModuleList([net.blocks[first], *(nn.Sequential(*(net.blocks[i] for i in group))
                                                           for group in later)])
        stride_two = net.blocks[5][0]  # keep F4 at 1/8
        stride_two.conv_dw.stride = (1, 1)
        stride_two.shortcut[0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def ghost_modules(self) -> list[nn.Module]:
        return [m for m in self.modules() if type(m).__name__ == "GhostModule"]


def ghost_card(layout: str) -> EncoderCard:
    """The pretrained slot of a GhostNet layout: a timm ghostnet_100 file, its `blocks.i.` keys renamed to the
    stage that holds block i; the blocks a layout drops, conv_head and the classifier are unused."""
    (first,), *later = GHOST_LAYOUTS[layout]
    rename = [("conv_stem.", "stem.0."), ("bn1.", "stem.1."), (f"blocks.{first}.", "stages.0.")]
    rename += [(f"blocks.{i}.", f"stages.{k}.{j}.") for k, group in enumerate(later, 1) for j, i in enumerate(group)]
    return EncoderCard(family="timm", name="ghostnet_100", module="encoder", first_conv="stem.0.weight",
                       rename=tuple(rename))


SWAPPED_ENCODERS = ("vgg16", "resnet50", "mobilenet_v2", "inception_v3")  # paper Table 5's other backbones
SMP_NAMES = {"inception_v3": "tu-inception_v3"}  # smp's timm-universal encoder: timm's Inception-v3 (paper ref. 33)
UNDILATED = ("vgg16", "inception_v3")  # no output-stride-8 form: their 1/16 feature is resized to 1/8
# Inception-v3's slot: a timm inception_v3 file under smp's timm-universal wrapper (`model.`); fc is unused
INCEPTION_V3 = EncoderCard(family="timm", name="inception_v3", module="encoder.body",
                           first_conv="model.Conv2d_1a_3x3.conv.weight", rename=(("", "model."),))


class SwappedEncoder(nn.Module):
    """Table 5's backbone swap: an smp encoder (random init or `encoder_weights`) giving four features at
    1/2, 1/4, 1/8, 1/8: ResNet-50 and MobileNetV2 dilate their 1/16 stage (output stride 8); VGG-16 and
    Inception-v3 cannot (smp builds them for stride 32 only), so their 1/16 feature is resized bilinearly to 1/8
    (ours). Inception-v3's unpadded convs leave its maps a few pixels short of 1/2, 1/4, 1/8 (61, 28, 13 at
    128 px); the decoder upsamples to each skip's own size and to the input's, so no padding is added (ours)."""

    def __init__(self, name: str, in_channels: int = 3):
        super().__init__()
        from segmentation_models_pytorch.encoders import get_encoder

        self.body = get_encoder(SMP_NAMES.get(name, name), in_channels=in_channels, depth=4, weights=None,
                                output_stride=32 if name in UNDILATED else 8)
        self.channels = tuple(self.body.out_channels[1:5])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1, f2, f3, f4 = self.body(x)[1:5]
        if f4.shape[-2:] != f3.shape[-2:]:
            f4 = F.interpolate(f4, size=f3.shape[-2:], mode="bilinear", align_corners=False)
        return [f1, f2, f3, f4]

    def ghost_modules(self) -> list[nn.Module]:
        return []


class IntrinsicRecorder:
    """Forward hooks on the primary convs of Ghost modules that keep their outputs while recording is on."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor] = []
        self.enabled = False
        for module in modules:
            module.primary_conv.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.enabled:
            self.outputs.append(output)


FOVEA_UNET = NetworkCard(
    paper="Liu et al., Fovea-UNet: detection and segmentation of lymph node metastases in colorectal cancer with deep "
          "learning, BioMedical Engineering OnLine 2023",
    size_multiple=8, default_size=512, encoder=ghost_card("ghostnet_4b"),
    paper_weights="an ImageNet GhostNet backbone (paper, Experiment settings)",
    # its summed-area tables and gathers run in fp32/fp64 whatever the autocast: bf16 made a training step
    # slower (1.8 -> 1.0 img/s, 128 px, issue 13's measurement)
    fast_path=False)


@register_model("fovea_unet", FOVEA_UNET)
class FoveaUNet(ExtraLosses, NamedFeatureLayers, SegmentationNetwork):
    """Fovea-UNet: H-GhostNet encoder, Fovea Pooling on every skip (PSANet importance, variable radius),
    U-Net-style decoder; nHSIC on the Ghost modules' intrinsic features as an extra loss."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, boundaries: tuple[float, ...] = BOUNDARIES,
                 pooling: str = "lp", hard: bool = False, attention_size: int = 32,
                 decoder_widths: tuple[int, ...] = (512, 256, 128, 64), nhsic: bool = True,
                 nhsic_channels: int | None = None, encoder: str = "ghostnet_4b", nhsic_samples: str = "images"):
        super().__init__()
        if pooling not in AGGREGATIONS:
            raise MedsegError(f"pooling must be one of {AGGREGATIONS}, got {pooling!r}")
        if len(boundaries) != 4 or len(decoder_widths) != 4:
            raise MedsegError("boundaries and decoder_widths take four values (F1..F4, D4..D1)")
        if encoder in GHOST_LAYOUTS:
            self.encoder: nn.Module = HGhostNet(in_channels, encoder)
            channels = ENCODER_CHANNELS[encoder]
        elif encoder in SWAPPED_ENCODERS:
            if nhsic:
                raise MedsegError(f"nHSIC acts on Ghost modules; encoder {encoder!r} needs nhsic: false "
                                  "(paper Table 5)")
            self.encoder = SwappedEncoder(encoder, in_channels)
            channels = self.encoder.channels
        else:
            raise MedsegError(f"encoder must be one of {', '.join((*GHOST_LAYOUTS, *SWAPPED_ENCODERS))}, "
                              f"got {encoder!r}")
        self.skips = nn.ModuleList(FoveaSkip(c, s, attention_size, pooling, hard) for c, s in zip(channels, boundaries))
        c1, c2, c3, c4 = channels
        d4, d3, d2, d1 = decoder_widths
        self.decoder = nn.ModuleList([DoubleConv(c4 + c3, d4), DoubleConv(d4 + c2, d3), DoubleConv(d3 + c1, d2),
                                      DoubleConv(d2, d1)])
        self.head = nn.Conv2d(d1, num_classes, 1)
        if nhsic_samples not in NHSIC_SAMPLES:
            raise MedsegError(f"nhsic_samples must be one of {', '.join(NHSIC_SAMPLES)}, got {nhsic_samples!r}")
        self.nhsic, self.nhsic_channels, self.nhsic_samples = nhsic, nhsic_channels, nhsic_samples
        self.recorder = IntrinsicRecorder(self.encoder.ghost_modules())

    @classmethod
    def encoder_card(cls, card: NetworkCard, options: dict[str, Any]) -> EncoderCard | None:
        """The timm ghostnet_100 slot of a GhostNet layout, else the swapped smp encoder's at `encoder.body`."""
        if options["encoder"] in GHOST_LAYOUTS:
            return ghost_card(options["encoder"])
        if options["encoder"] == "inception_v3":
            return INCEPTION_V3
        return smp_encoder_card(options["encoder"], "encoder.body")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.recorder.outputs = []
        self.recorder.enabled = self.training and self.nhsic
        f1, f2, f3, f4 = (skip(f) for skip, f in zip(self.skips, self.encoder(x)))
        self.recorder.enabled = False
        y = self.decoder[0](torch.cat([f4, f3], dim=1))
        y = self.decoder[1](torch.cat([_up(y, f2), f2], dim=1))
        y = self.decoder[2](torch.cat([_up(y, f1), f1], dim=1))
        y = self.decoder[3](_up(y, x))
        return self.head(y)

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """nHSIC of the last training forward: the mean over the Ghost modules' intrinsic features (ours).
        Nothing when nHSIC is off or the encoder is frozen (it could not change the features)."""
        if not self.nhsic:
            return {}
        outputs, self.recorder.outputs = self.recorder.outputs, []
        if not outputs or not any(p.requires_grad for p in self.encoder.parameters()):
            return {"nhsic": torch.zeros((), device=self.head.weight.device)}
        return {"nhsic": torch.stack([nhsic_penalty(o, self.nhsic_channels, samples=self.nhsic_samples)
                                      for o in outputs]).mean()}

    def analysis_layers(self) -> list[str]:
        """The primary convs of the encoder's Ghost modules (the intrinsic features nHSIC acts on, paper Fig. 5),
        in forward order; none with a swapped encoder."""
        ghosts = {id(m) for m in self.encoder.ghost_modules()}
        return [f"{name}.primary_conv" for name, m in self.named_modules() if id(m) in ghosts]


def _up(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(y, size=like.shape[-2:], mode="bilinear", align_corners=False)
