"""EH-Former (Qu, Zhou, Jiang, Wang, Wang, Wang, Tang & Lin, "EH-former: Regional easy-hard-aware transformer for
breast lesion segmentation in ultrasound images", Information Fusion 109, 102430, 2024), a baseline of STS-Net's
Table 1 (Sci. Rep. 2025, "EH-former", 86.37 M parameters, 275.52 GFLOPs), built as the authors' code builds it
(lele0109/EH-Former: model/my_net.py, model/segformer_backbone.py, model/ru_part.py, model/fusion_part.py, main.py,
loss_metrics.py, dataloader.py).

Two stages (paper abstract; code `Coarse_SegRes`, then `Fine_SegRes_EnFuse_SACAV3_Independent`, the network main.py
trains), one class here with the option `stage`:

- Stage 1 (`stage=1`, code `Coarse_SegRes`): a MiT-B5 (SegFormer) encoder with Monte-Carlo dropout (p = 0.5, active
  in evaluation too, code `baal` Dropout) on each stage's output, which also feeds the next stage, and a decoder of
  four residual up-blocks (code `RU_up_MCD`: a 2x2 transposed conv, conv-BN-ReLU-MC dropout-conv-BN plus a 1x1
  conv-GroupNorm shortcut, ReLU) to 16 channels at 1/2, a 1x1 head and a bilinear resize (align_corners=True).
  A `stage=1` network is this part alone (86,371,345 parameters), so its run trains, saves and counts only it.
- Stage 2 (`stage=2`, the default, code `Fine_...`): the stage-1 network (`coarse`) is frozen with its BatchNorm in
  evaluation mode (code `fix_bn`); `model.weights` = a stage-1 run's model file initialises it, the stage-2 parts
  (`easy`, `hard`, `fusion`, `decoder`: the card's `later_stage`) keep their init and the load report lists them
  (main.py: `--Cnet_path` loads the stage-1 weights into the new network). In training, six stochastic passes of it
  give the uncertainty map u = (var / max var + mean entropy / max mean entropy) / 2 (code `uncertain_map: 'var +
  mean'`; the variance is the unbiased one over the six sigmoid maps, the entropy -p log(p + 1e-9) per map, both
  maxima over the whole batch) and its complement max(u) - u. Two streams, each a MiT-B5 with the stage-1 decoder
  layout (no MC dropout) and a head, run on the image: the easy stream with u, the hard stream with the complement, as
  DropKey ratios.
- AdaSep (code `Attention_Drop`, main.py `mode='dim_query'`, `dropkey_rate` [0.4, 0.32, 0.24, 0.16] per stage): in
  training each attention row (query) of every block is dropped with probability ratio(stage) x map, the map
  resized bilinearly to the stage's token grid (each stage from the previous stage's map, as the code does), drawn
  per head. The code adds -1e12 to every logit of a dropped row; in fp32 that erases the row's differences, so its
  softmax is uniform. We set the row's logits to 0, which gives the same uniform row in any precision.
- D-Fusion (code `SACA_Gate_V3`, 'encoder' mode), per encoder level: spatial attention (7x7 conv on channel mean and
  max) on each stream, a gate sigmoid(1x1 conv(GAP[hard, easy, previous fused level])), then
  alpha (1 - gate) SA(easy) easy + (1 - alpha) gate SA(hard) hard, channel attention (CBAM's, ratio 16), a 3x3
  conv-BN-ReLU and, above level 1, plus the previous fused level (3x3 conv-BN-ReLU, 2x2 max-pool). alpha is
  1 - 0.5 epoch / epochs (main.py, set at each epoch's start through `EpochScheduled`); it is a buffer, so a saved
  model keeps the alpha of its epoch (the code stores it in its checkpoint for testing).
- A decoder like the streams' on the fused levels gives the output. In training the streams' own outputs are scored
  by `extra_losses`: a BCE weighted per pixel by the region map of its stream (easy: max(u) - u, hard: u); the code
  imports this `UncertainBCE` but leaves its loss computation out of the published main.py, so which map weighs
  which stream is ours.

The MiT-B5 is segmentation_models_pytorch's `mit_b5` (the same layers and key names as the code's `mit_b5`: embed
dims 64-128-320-512, heads 1-2-5-8, depths 3-6-40-3, reduction ratios 8-4-2-1, qkv bias, LayerNorm eps 1e-6), with
the code's two differences applied: no stochastic depth (code drop_path_rate 0; smp's default is 0.1) and the tanh
approximation of GELU (code `GELU`). Its attention runs through `dropkey_attention` on smp's own layers.
`encoder_weights: PATH` loads a local smp / SegFormer mit_b5 file into the stage-1 encoder; the published code builds
every MiT-B5 with pretrained=False.

Parameters (3 in, 1 out): 270,629,396 = the code's (counted on `Fine_SegRes_EnFuse_SACAV3_Independent`): the
stage-1 network 86,371,345 (frozen in stage 2), each stream 86,371,345, fusion 6,587,024, decoder 4,928,337.
STS-Net Table 1's 86.37M is exactly one of the three MiT-B5 networks (the stage-1 network, or one stream), not
EH-Former. Binary only (sigmoid maps, as the code), so `num_classes` must be 1. Inputs: any multiple of 32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import get_encoder
from torch import nn
from torch.overrides import TorchFunctionMode

from medseg.errors import MedsegError
from medseg.models.base import EncoderCard, EpochScheduled, ExtraLosses, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

ENCODER = "mit_b5"
WIDTHS = (64, 128, 320, 512)  # MiT-B5 stage widths
DECODER_WIDTHS = (256, 128, 64, 16)  # code: RU_up out_ch, deepest first
DROPKEY_RATIOS = (0.4, 0.32, 0.24, 0.16)  # main.py dropkey_rate, per stage
MC_DROPOUT = 0.5  # code: Coarse_SegRes(dropout_rate=0.5)
MC_SAMPLES = 6  # code: n_sample=6
ENTROPY_EPS = 1e-9  # code: log(p + 1e-9)


class SkippedInit(TorchFunctionMode):
    """Turns the in-place fills of weight initialisation into no-ops while a module is built (ours)."""

    FILLS = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.erfinv_, torch.Tensor.clamp_,
             torch.Tensor.mul_, torch.Tensor.add_, torch.Tensor.fill_, torch.Tensor.zero_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return args[0] if func in self.FILLS else func(*args, **(kwargs or {}))


def mit_b5(in_channels: int) -> nn.Module:
    """smp's MiT-B5 with the code's settings: no stochastic depth, tanh-approximated GELU.

    Initialised once, as SegFormer does: smp re-applies the same init per layer, per block and per encoder, which
    takes a quarter of a minute per MiT-B5 on a CPU, so it is built with the fills skipped. SegFormer's
    trunc_normal(std 0.02, a=-2, b=2) truncates at 100 standard deviations: it is a normal(0, 0.02)."""
    device = torch.get_default_device()  # meta when `medseg weights inspect` plans a load
    with torch.device("cpu"), SkippedInit():  # smp's constructor reads tensors (.item()): not on meta
        encoder = get_encoder(ENCODER, in_channels=in_channels, weights=None).to(device)
    initialised = 0
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, 0.02)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                module.weight.normal_(0, math.sqrt(2.0 / fan_out))
            else:
                continue
            module.bias.zero_()  # every Linear, LayerNorm and Conv2d of MiT has a bias
            initialised += 2
    if initialised != len(list(encoder.parameters())):
        raise RuntimeError("mit_b5: a parameter outside Linear / LayerNorm / Conv2d was left uninitialised")
    for stage in (encoder.block1, encoder.block2, encoder.block3, encoder.block4):
        for block in stage:
            block.drop_path = nn.Identity()
            block.mlp.act = nn.GELU(approximate="tanh")
    return encoder


def dropkey_attention(attn: nn.Module, tokens: torch.Tensor, height: int, width: int,
                      drop_ratio: torch.Tensor | None) -> torch.Tensor:
    """SegFormer's efficient self-attention on smp's `Attention` layers; `drop_ratio` (B, N, 1), when given, is
    each query's probability of being dropped (its row made uniform), drawn per head."""
    batch, length, channels = tokens.shape
    heads = attn.num_heads
    query = attn.q(tokens).reshape(batch, length, heads, channels // heads).transpose(1, 2)
    if attn.sr_ratio > 1:
        grid = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        context = attn.norm(attn.sr(grid).reshape(batch, channels, -1).transpose(1, 2))
    else:
        context = tokens
    key, value = attn.kv(context).reshape(batch, -1, 2, heads, channels // heads).permute(2, 0, 3, 1, 4)
    logits = (query @ key.transpose(-2, -1)) * attn.scale
    if drop_ratio is not None:
        dropped = torch.bernoulli(drop_ratio.unsqueeze(1).expand(-1, heads, -1, -1)).bool()  # (B, heads, N, 1)
        logits = logits.masked_fill(dropped, 0.0)
    out = (logits.softmax(dim=-1) @ value).transpose(1, 2).reshape(batch, length, channels)
    return attn.proj_drop(attn.proj(out))


def encode(encoder: nn.Module, x: torch.Tensor, drop_map: torch.Tensor | None = None,
           feature_dropout: float = 0.0) -> list[torch.Tensor]:
    """The four MiT stages. `drop_map` (B, 1, H, W): DropKey ratios per pixel (scaled by `DROPKEY_RATIOS`);
    `feature_dropout`: MC dropout on each stage's output, always on (stage 1)."""
    stages = ((encoder.patch_embed1, encoder.block1, encoder.norm1), (encoder.patch_embed2, encoder.block2,
              encoder.norm2), (encoder.patch_embed3, encoder.block3, encoder.norm3),
              (encoder.patch_embed4, encoder.block4, encoder.norm4))
    features = []
    for (embed, blocks, norm), ratio in zip(stages, DROPKEY_RATIOS):
        x = embed(x)
        batch, channels, height, width = x.shape
        drop_ratio = None
        if drop_map is not None:
            drop_map = F.interpolate(drop_map, size=(height, width), mode="bilinear", align_corners=False)
            drop_ratio = drop_map.flatten(2).transpose(1, 2) * ratio
        tokens = x.flatten(2).transpose(1, 2)
        for block in blocks:
            tokens = tokens + dropkey_attention(block.attn, block.norm1(tokens), height, width, drop_ratio)
            tokens = tokens + block.mlp(block.norm2(tokens), height, width)
        x = norm(tokens.transpose(1, 2).reshape(batch, channels, height, width)).contiguous()  # as smp's forward
        if feature_dropout:
            x = F.dropout(x, feature_dropout, training=True)
        features.append(x)
    return features


class ResidualUp(nn.Module):
    """The code's `RU_up` / `RU_up_MCD`: 2x2 transposed conv, concat with the skip, a conv-BN-ReLU-conv-BN body
    (MC dropout in the middle for stage 1) plus a 1x1 conv-GroupNorm shortcut, ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, mc_dropout: float = 0.0):
        super().__init__()
        joined = in_channels + skip_channels
        self.up = nn.ConvTranspose2d(in_channels, in_channels, 2, stride=2)
        self.mc_dropout = mc_dropout
        self.conv1 = nn.Sequential(nn.Conv2d(joined, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels))
        groups = 32 if out_channels % 32 == 0 else 16  # code: 32 groups, 16 for the 16-channel last block
        self.shortcut = nn.Sequential(nn.Conv2d(joined, out_channels, 1, bias=False),
                                      nn.GroupNorm(groups, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if skip is not None:
            x = torch.cat([skip, x], dim=1)
        body = self.conv1(x)
        if self.mc_dropout:
            body = F.dropout(body, self.mc_dropout, training=True)
        return F.relu(self.shortcut(x) + self.conv2(body))


class Decoder(nn.Module):
    """Four residual up-blocks from the 1/32 level to 16 channels at 1/2, a 1x1 head, a resize to the input."""

    def __init__(self, num_classes: int, mc_dropout: float = 0.0):
        super().__init__()
        ins, skips = (WIDTHS[3], *DECODER_WIDTHS[:3]), (WIDTHS[2], WIDTHS[1], WIDTHS[0], 0)
        self.ups = nn.ModuleList(ResidualUp(i, s, o, mc_dropout) for i, s, o in zip(ins, skips, DECODER_WIDTHS))
        self.head = nn.Conv2d(DECODER_WIDTHS[-1], num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        f1, f2, f3, f4 = features
        y = f4
        for up, skip in zip(self.ups, (f3, f2, f1, None)):
            y = up(y, skip)
        return F.interpolate(self.head(y), size=size, mode="bilinear", align_corners=True)


class SegFormerBranch(nn.Module):
    """A MiT-B5 and a decoder: the stage-1 network (MC dropout) or one stream of stage 2 (DropKey)."""

    def __init__(self, in_channels: int, num_classes: int, mc_dropout: float = 0.0):
        super().__init__()
        self.mc_dropout = mc_dropout
        self.encoder = mit_b5(in_channels)
        self.decoder = Decoder(num_classes, mc_dropout)

    def forward(self, x: torch.Tensor, drop_map: torch.Tensor | None = None
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = encode(self.encoder, x, drop_map, self.mc_dropout)
        return features, self.decoder(features, x.shape[-2:])


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """The code's fusion `conv`: 3x3 without bias (Kaiming-normal init), BN, ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class SpatialAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False), nn.ReLU(),
                                 nn.Conv2d(channels // reduction, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1)))


class FusionGate(nn.Module):
    """D-Fusion at one level (code `SACA_Gate_V3`, 'encoder' mode): easy and hard features weighted by alpha, a
    learned gate and spatial attention; channel attention; plus the previous fused level."""

    def __init__(self, channels: int, previous_channels: int):
        super().__init__()
        self.easy_attention, self.hard_attention = SpatialAttention(), SpatialAttention()
        self.channel_attention = ChannelAttention(channels)
        self.out_conv = conv_bn_relu(channels, channels)
        self.previous = conv_bn_relu(previous_channels, channels) if previous_channels else None
        self.gate = nn.Conv2d(3 * channels if previous_channels else 2 * channels, channels, 1)

    def forward(self, easy: torch.Tensor, hard: torch.Tensor, previous: torch.Tensor | None,
                alpha: torch.Tensor) -> torch.Tensor:
        pooled = [hard, easy]
        if self.previous is not None:
            previous = F.max_pool2d(self.previous(previous), 2)
            pooled.append(previous)
        gate = torch.sigmoid(self.gate(F.adaptive_avg_pool2d(torch.cat(pooled, dim=1), 1)))
        fused = (alpha * (1 - gate) * self.easy_attention(easy) * easy
                 + (1 - alpha) * gate * self.hard_attention(hard) * hard)
        fused = self.out_conv(self.channel_attention(fused) * fused)
        return fused if previous is None else fused + previous


def uncertainty_map(samples: torch.Tensor) -> torch.Tensor:
    """(S, B, 1, H, W) sigmoid maps of the MC passes -> u in [0, 1] (B, 1, H, W): the mean of the normalised
    variance and the normalised mean entropy (code `uncertain_map: 'var + mean'`)."""
    variance = samples.var(dim=0)  # unbiased, as torch.var in the code
    entropy = (-(samples * torch.log(samples + ENTROPY_EPS)).sum(dim=2, keepdim=True)).mean(dim=0)
    tiny = torch.finfo(samples.dtype).tiny  # ours: no 0 / 0 when every pass agrees
    return (variance / variance.max().clamp_min(tiny) + entropy / entropy.max().clamp_min(tiny)) / 2


EH_FORMER_PAPER = ("Qu, Zhou, Jiang, Wang, Wang, Wang, Tang & Lin, EH-former: Regional easy-hard-aware transformer for "
                   "breast lesion segmentation in ultrasound images, Information Fusion 109 (2024)")
MIT_B5 = EncoderCard(family="smp", name=ENCODER, module="coarse.encoder", first_conv="patch_embed1.proj.weight")
STAGE_TWO_PARTS = ("easy", "hard", "fusion", "decoder")
CARD = NetworkCard(paper=EH_FORMER_PAPER, size_multiple=32, default_size=224, encoder=MIT_B5,
                   paper_weights="its stage-1 network for stage 2 (recipe ehformer: model.weights = the "
                                 "ehformer_stage1 run's model/model.safetensors)",
                   later_stage=STAGE_TWO_PARTS)


@register_model("ehformer", CARD)
class EHFormer(EpochScheduled, ExtraLosses, SegmentationNetwork):
    """EH-Former: MiT-B5 easy and hard streams split by a stage-1 network's uncertainty, fused by epoch."""

    groups = {"encoder": ("coarse.encoder", "easy.encoder", "hard.encoder")}

    def __init__(self, in_channels: int = 3, num_classes: int = 1, stage: int = 2):
        super().__init__()
        if num_classes != 1:
            raise MedsegError(f"ehformer is binary only (its uncertainty and streams are sigmoid maps), got "
                              f"num_classes={num_classes}; set model.num_classes: 1")
        if stage not in (1, 2):
            raise MedsegError(f"ehformer: stage must be 1 (the uncertainty network) or 2 (EH-Former), got {stage}")
        self.stage = stage
        self.coarse = SegFormerBranch(in_channels, num_classes, MC_DROPOUT)
        self.register_buffer("alpha", torch.ones(()))  # D-Fusion's easy weight: 1 at the first epoch
        if stage == 1:  # the stage-1 network alone: its file holds only `coarse` (and alpha)
            return
        self.easy = SegFormerBranch(in_channels, num_classes)
        self.hard = SegFormerBranch(in_channels, num_classes)
        self.fusion = nn.ModuleList(FusionGate(w, p) for w, p in zip(WIDTHS, (0, *WIDTHS[:3])))
        self.decoder = Decoder(num_classes)
        self.coarse.requires_grad_(False)  # code: the stage-1 network is frozen in stage 2

    def train(self, mode: bool = True) -> "EHFormer":
        super().train(mode)
        if self.stage == 2:
            self.coarse.eval()  # code: fix_bn on the frozen stage-1 network (its MC dropout stays on)
        return self

    def set_training_progress(self, epoch: int, epochs: int) -> None:
        self.alpha.fill_(1 - 0.5 * epoch / epochs)  # main.py: alpha = 1 - 0.5 * (epoch / epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stage == 1:
            return self.coarse(x)[1]
        easy_map = hard_map = None
        if self.training:
            with torch.no_grad():
                samples = torch.stack([torch.sigmoid(self.coarse(x)[1].float()) for _ in range(MC_SAMPLES)])
                easy_map = uncertainty_map(samples)  # the easy stream drops the uncertain queries
                hard_map = easy_map.max() - easy_map
        easy_features, easy_logits = self.easy(x, easy_map)
        hard_features, hard_logits = self.hard(x, hard_map)
        fused, previous = [], None
        for gate, easy, hard in zip(self.fusion, easy_features, hard_features):
            previous = gate(easy, hard, previous, self.alpha)
            fused.append(previous)
        # each stream is scored where its regions are: the easy one where u is low, the hard one where it is high
        self.keep_for_losses({"easy_stream": easy_logits, "easy_weight": hard_map,
                              "hard_stream": hard_logits, "hard_weight": easy_map} if self.training else None)
        return self.decoder(fused, x.shape[-2:])

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The streams' BCE, weighted per pixel by their region maps, from the last stage-2 training forward;
        nothing for stage 1 or after an evaluation forward (no streams were scored)."""
        if self.kept_for_losses is None:
            return {}
        streams = self.take_kept()
        target = (mask > 0).float().unsqueeze(1)
        return {name: F.binary_cross_entropy_with_logits(streams[name].float(), target,
                                                         weight=streams[name.replace("stream", "weight")])
                for name in ("easy_stream", "hard_stream")}
