"""STS-Net (Zhao et al., "A novel framework for segmentation of small targets in medical images", Scientific
Reports 2025), pinned down from the paper and the authors' code (zlxokok/STSNet), and the encoder / decoder /
attention families of its ablations (Tables 5, 6, 8, 9).

- Network (paper Methods, Fig. 3; the authors' code): segmentation_models_pytorch DeepLabV3 on ResNeXt50-32x4d with
  output stride 8 (layer3 and layer4 dilated), ASPP with 256 channels and rates 12/24/36, a two-class 1x1
  head and x8 bilinear upsampling. **ESCA is applied in-line after each of the five encoder stages**: the
  re-weighted tensor is what the next stage (and the decoder) receives.
- ESCA (paper Eq. 5-9; the authors' `eca_layer`): y = GAP(x) read as a sequence over channels,
  y' = conv1d_k(conv1d_k(y)) with ONE shared kernel applied twice (zero padding, no bias, nothing between),
  out = x * sigmoid(y'). k = 3 at every stage as in the code; `adaptive_k` uses the ECA-Net rule
  k = odd(|(log2 C + 1) / 2|), i.e. 3/5/5/5/7.
- Ablations, by recipe keys (`model.decoder`, `model.encoder`, `model.attention`): decoders DeepLabV3,
  DeepLabV3+, U-Net, UNet++, PAN, FPN (smp, with smp's defaults for the non-DeepLabV3 ones); encoders
  ResNeXt50-32x4d, ResNet50, MobileNetV2, EfficientNet-b0, DPN68 (smp); attention none / SE / CBAM / ECA
  (timm's modules) / GCT / SRM (below; Table 9) / ESCA, always at the five stage outputs. Attention sits in
  forward hooks on the modules that produce each stage's output, so encoder weights keep smp's names and local
  smp/torchvision encoder checkpoints load (`encoder_weights: PATH`). A DPN stage's output is a (residual, dense)
  pair: its attention sees the concatenation, as the decoder does, and the pair is split back.
- GCT (Yang et al., "Gated Channel Transformation for Visual Recognition", CVPR 2020, Eq. 1-3): the l2 embedding
  s_c = alpha_c * sqrt(sum x_c^2 + eps), channel normalisation s^_c = s_c / sqrt(mean_c s_c^2 + eps) (their sqrt(C)
  s / ||s||), gate 1 + tanh(gamma_c s^_c + beta_c); alpha = 1, gamma = beta = 0 at init (an identity, Sec. 3.4),
  eps 1e-5. 3C parameters per stage.
- SRM (Lee, Kim & Nam, "SRM: A Style-based Recalibration Module for Convolutional Neural Networks", ICCV 2019,
  Sec. 3): style pooling t_c = (mean, std) over the positions (std = sqrt(unbiased var + 1e-5)), a channel-wise
  fully connected layer z_c = w_c . t_c (2 weights per channel, no bias, zero at init as the authors' code),
  BatchNorm over z, gate sigmoid. 4C parameters per stage (CFC 2C + BN affine 2C; the BN's running mean and
  variance are the paper's other 2C of "6C"). Its BatchNorm needs batches of 2 or more in training.
  timm has neither module (STS-Net's code names neither: the paper's Table 9 cites the two papers); ours from
  their equations.
- Encoder weights go through `medseg.models.pretrained`: `encoder_card` picks the slot of the chosen
  `encoder=` from `smp_encoder_card`'s table (its first-conv key); with 1 or 4+ input channels the file's
  first conv is adapted by timm's adapt_input_conv, which is what smp's patch_first_conv does.

`deeplabv3_stsnet`: DeepLabV3 at STS-Net Table 1's 18.85M. The authors' code holds no baselines (its `duibi`
folder is not released), so the setting is found by count (ours): smp DeepLabV3 (OS 8, ASPP 256, rates 12/24/36)
on each smp encoder, DPN68 is the only one within 1 % (18,876,972 with 3 in and 2 classes, +0.14 %; the next is
3 % off), and DPN68 is one of the paper's own encoders (Table 5).

Parameters (3 in, 2 classes): 39,105,873 = smp DeepLabV3-ResNeXt50 39,105,858 + 5 x 3 ESCA weights, the
paper's "39.10M" (Table 1). The paper reports MACs for a batch of 4 (its 571.35G = 4 x our 142.4 GMACs).
"""

from __future__ import annotations

import math
from typing import Any

import segmentation_models_pytorch as smp
import torch
from timm.layers import create_attn
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.pretrained import smp_encoder_card
from medseg.models.registry import register_model

DECODERS = {"deeplabv3": "DeepLabV3", "deeplabv3plus": "DeepLabV3Plus", "unet": "Unet", "unetplusplus": "UnetPlusPlus",
            "pan": "PAN", "fpn": "FPN"}
ENCODERS = ("resnext50_32x4d", "resnet50", "mobilenet_v2", "efficientnet-b0", "dpn68")
ATTENTIONS = ("esca", "eca", "se", "cbam", "gct", "srm", "none")
PAN_MIN_SIZE = 128


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA-Net's adaptive kernel: the odd number nearest above |(log2 C + b) / gamma|."""
    k = int(abs((math.log2(channels) + b) / gamma))
    return k if k % 2 else k + 1


class ESCA(nn.Module):
    """Efficient shared channel attention: one 1-D conv over the channel descriptor, applied twice."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        descriptor = x.mean(dim=(2, 3)).unsqueeze(1)  # (B, 1, C)
        weights = torch.sigmoid(self.conv(self.conv(descriptor)))
        return x * weights.transpose(1, 2).unsqueeze(-1)


class GCT(nn.Module):
    """Gated channel transformation: l2 context embedding, channel normalisation, 1 + tanh gate."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.alpha * (x.pow(2).sum(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        normalised = embedding / (embedding.pow(2).mean(dim=1, keepdim=True) + self.eps).sqrt()
        return x * (1 + torch.tanh(self.gamma * normalised + self.beta))


class SRM(nn.Module):
    """Style-based recalibration: (mean, std) style pooling, channel-wise FC, BatchNorm, sigmoid gate."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.cfc = nn.Parameter(torch.zeros(channels, 2))
        self.norm = nn.BatchNorm2d(channels)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:  # BatchNorm over one value per channel is undefined
            raise ValueError("SRM attention normalises its style features over the batch: train with "
                             "train.batch_size >= 2 (and a last batch of at least 2 images)")
        flat = x.flatten(2)
        style = torch.stack([flat.mean(dim=2), (flat.var(dim=2) + self.eps).sqrt()], dim=2)  # (B, C, 2)
        z = (style * self.cfc).sum(dim=2)[..., None, None]
        return x * torch.sigmoid(self.norm(z))


def make_attention(kind: str, channels: int, adaptive_k: bool) -> nn.Module:
    if kind == "esca":
        return ESCA(channels, eca_kernel_size(channels) if adaptive_k else 3)
    if kind == "gct":
        return GCT(channels)
    if kind == "srm":
        return SRM(channels)
    if kind == "none":
        return nn.Identity()
    return create_attn(kind, channels)


class StageAttention:
    """Forward hook that replaces a stage's output by its attended version (in-line, not a side branch)."""

    def __init__(self, attention: nn.Module):
        self.attention = attention

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        if isinstance(output, tuple):  # DPN: (residual, dense) pair; attend to their concatenation
            sizes = [part.shape[1] for part in output]
            return tuple(torch.split(self.attention(torch.cat(output, dim=1)), sizes, dim=1))
        return self.attention(output)


def stage_modules(encoder: nn.Module, name: str) -> list[nn.Module]:
    """The five modules whose outputs are the encoder's stage outputs, in smp's encoder implementations."""
    if name in ("resnext50_32x4d", "resnet50"):
        return [encoder.relu, encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4]
    if name == "mobilenet_v2":
        return [encoder.features[i] for i in encoder._out_indexes]  # noqa: SLF001  (smp's stage boundaries)
    if name == "efficientnet-b0":
        return [encoder._swish, *(encoder._blocks[i] for i in encoder._out_indexes)]  # noqa: SLF001
    stages = encoder._stage_idxs  # noqa: SLF001  (dpn68)
    return [encoder.features[0].act, *(encoder.features[i - 1] for i in stages)]


class SMPSegmentation(SegmentationNetwork):
    groups = {"encoder": ("network.encoder", "attention")}

    def __init__(self, in_channels: int = 3, num_classes: int = 2, decoder: str = "deeplabv3",
                 encoder: str = "resnext50_32x4d", attention: str = "esca", adaptive_k: bool = False):
        super().__init__()
        self.decoder = decoder
        for value, allowed, what in ((decoder, DECODERS, "decoder"), (encoder, ENCODERS, "encoder"),
                                     (attention, ATTENTIONS, "attention")):
            if value not in allowed:
                raise MedsegError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
        extra = ({"encoder_output_stride": 8, "decoder_channels": 256, "decoder_atrous_rates": (12, 24, 36)}
                 if decoder == "deeplabv3" else {})
        self.network = getattr(smp, DECODERS[decoder])(encoder_name=encoder, encoder_weights=None,
                                                       in_channels=in_channels, classes=num_classes, **extra)
        channels = self.network.encoder.out_channels[1:]
        self.attention = nn.ModuleList(make_attention(attention, c, adaptive_k) for c in channels)
        if attention != "none":
            for module, attend in zip(stage_modules(self.network.encoder, encoder), self.attention):
                module.register_forward_hook(StageAttention(attend))

    @classmethod
    def encoder_card(cls, card: NetworkCard, options: dict[str, Any]) -> EncoderCard | None:
        """The smp encoder chosen by `encoder=`, at `network.encoder`."""
        return smp_encoder_card(options["encoder"], "network.encoder")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoder == "pan" and min(x.shape[-2:]) < PAN_MIN_SIZE:
            raise ValueError(f"the PAN decoder needs inputs of at least {PAN_MIN_SIZE} px "
                             f"(its pyramid pools the 1/32 map three more times), got {tuple(x.shape[-2:])}")
        return self.network(x)


RESNEXT50 = smp_encoder_card("resnext50_32x4d", "network.encoder")
STSNET = NetworkCard(paper="Zhao et al., A novel framework for segmentation of small targets in medical images "
                           "(STS-Net), Scientific Reports 2025",
                     size_multiple=32, default_size=512, paper_num_classes=2, head="network.segmentation_head",
                     encoder=RESNEXT50)
DEEPLABV3 = NetworkCard(
    paper="Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation (DeepLabV3), arXiv:1706.05587, "
          "2017, via segmentation_models_pytorch",
    size_multiple=32, default_size=512, paper_num_classes=2, head="network.segmentation_head", encoder=RESNEXT50)
DEEPLABV3PLUS = NetworkCard(
    paper="Chen et al., Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation "
          "(DeepLabV3+), ECCV 2018, via segmentation_models_pytorch",
    size_multiple=32, default_size=512, paper_num_classes=2, head="network.segmentation_head", encoder=RESNEXT50)
DEEPLABV3_STSNET = NetworkCard(
    paper="Chen et al., Rethinking Atrous Convolution for Semantic Image Segmentation (DeepLabV3), arXiv:1706.05587, "
          "2017, at STS-Net Table 1's 18.85M: segmentation_models_pytorch DeepLabV3 on DPN68",
    size_multiple=32, default_size=512, paper_num_classes=2, head="network.segmentation_head",
    encoder=smp_encoder_card("dpn68", "network.encoder"))
PAN = NetworkCard(
    paper="Li et al., Pyramid Attention Network for Semantic Segmentation, BMVC 2018, via segmentation_models_pytorch",
    size_multiple=32, default_size=512, paper_num_classes=2, head="network.segmentation_head", encoder=RESNEXT50)


@register_model("stsnet", STSNET)
class STSNet(SMPSegmentation):
    """STS-Net: DeepLabV3 (OS 8) on ResNeXt50-32x4d with ESCA after every encoder stage; ablation keys."""


@register_model("deeplabv3", DEEPLABV3, decoder="deeplabv3", attention="none")
@register_model("deeplabv3_stsnet", DEEPLABV3_STSNET, decoder="deeplabv3", attention="none", encoder="dpn68")
@register_model("deeplabv3plus", DEEPLABV3PLUS, decoder="deeplabv3plus", attention="none")
@register_model("pan", PAN, decoder="pan", attention="none")
class SMPBaseline(SMPSegmentation):
    """DeepLabV3 / DeepLabV3+ / PAN baselines (segmentation_models_pytorch), ResNeXt50-32x4d by default."""
