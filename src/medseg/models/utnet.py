"""UTNet (Gao, Zhou, Metaxas, "UTNet: A Hybrid Transformer Architecture for Medical Image Segmentation", MICCAI 2021), a
baseline of M2SNet's tables (arXiv:2303.10894, Tables 1-5 and the efficiency Table 6), pinned down from the paper (Sec.
2, Fig. 1) and the authors' code (yhygao/UTNet: model/utnet.py, model/conv_trans_utils.py, train_deep.py and the
README's default command `--reduce_size 8 --block_list 1234 --num_blocks 1,1,1,1 --aux_loss`).

- Stem (code `inc`): two pre-activation residual basic blocks (BN-ReLU-conv3x3 twice, no conv biases; a
  BN-ReLU-conv1x1 shortcut where the width changes; paper Fig. 1b), width C = 32 (code `--base_chan 32`).
- Encoder levels 1..4 (paper Sec. 2.3, code `down_block_trans`): 2x2 max pooling, one basic block to 2C/4C/8C/16C,
  then one Transformer encoder block (paper Fig. 1c, code `BasicTransBlock`): BN, efficient multi-head
  self-attention, residual; BN-ReLU-conv1x1 (no bias), residual.
- Efficient self-attention (paper Sec. 2.1, Eq. 3; code `LinearAttention`): q, k, v from one depthwise-separable
  conv (no biases), keys and values bilinearly resized (align_corners) to 8 x 8 (`reduce_size 8`), 4 heads of C/4
  channels (the code splits channels head-minor: channel = d * heads + h), a learned 2D relative position bias
  (paper Sec. 2.2, Eq. 5; code `RelativePositionBias`: a (2*8-1)^2 x heads table, each query position reads the
  row of its 8 x 8 cell) added to q.k BEFORE the 1/sqrt(d) scaling as in the code, softmax, attention dropout 0.1,
  output depthwise-separable conv and dropout 0.1 (train_deep.py: attn_drop = proj_drop = 0.1).
- Decoder levels (paper Sec. 2.3, code `up_block_trans` with num_block 0) at 1/8, 1/4, 1/2: the Transformer
  decoder block (code `BasicTransDecoderBlock`): queries from the BN'd skip, keys / values from the BN'd coarser
  map (resized to 8 x 8), plus a residual of the coarser map through a 1x1 conv (with bias) bilinearly upsampled;
  then BN-ReLU-conv1x1; concatenated with the skip and one basic block. The last level (full size, level 0 not in
  the block list) is the code's `up_block`: bilinear x2, 1x1 conv (bias), concatenation, two basic blocks.
- Heads (`heads`, main first): 1x1 conv (bias). Deep supervision (code `aux_loss`, on in the README's command):
  1x1 convs on the 1/2, 1/4 and 1/8 decoder maps bilinearly upsampled (align_corners) to the input size; in
  training mode `forward` returns [main, 1/2, 1/4, 1/8], weighted 1, 0.4, 0.2, 0.1 by the recipe (code
  `--aux_weight`); in eval mode the main output only.

Parameters: 10,020,304 for the code's default UTNet(1 in, 4 classes) and 10,019,500 for 3 in / 1 class, both
equal to the reference code (counted on yhygao/UTNet model/utnet.py). M2SNet's Table 6 lists UTNet at "34.0" M,
and its tables name the backbone "R-50 + ViT-B16" (the TransUNet entry's); no configuration of the reference code
gives 34.0M (UTNet with base_chan 32: 10.0M, base_chan 64: 40.0M; the code's ResNet50-UTNet: 29.2M), so medseg
pins the reference code's own count and reports the difference.

Checked against the reference code (weights copied across, dropout off): the four outputs are equal at 256 x 256.
The code resizes keys / values only when the map's height differs from 8, so a 1/16 map of 8 x 16 fails there;
medseg resizes whenever the map is not 8 x 8 (ours), which is the same on square inputs.

Inputs: the relative position bias repeats its 8 x 8 table by whole cells, so every attention level (down to 1/16)
must be a multiple of 8: H and W multiples of 128 (the code crops 256 x 256).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

REDUCE_SIZE = 8  # code: --reduce_size 8, keys / values resized to 8 x 8
HEADS = 4  # code (train_deep.py): num_heads [4, 4, 4, 4]
DROPOUT = 0.1  # code (train_deep.py): attn_drop = proj_drop = 0.1
BASE_CHANNELS = 32  # code: --base_chan 32


class PreActBasicBlock(nn.Module):
    """Pre-activation residual block (paper Fig. 1b): BN-ReLU-conv3x3 twice, a BN-ReLU-conv1x1 shortcut if needed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False))
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.ReLU(), nn.Conv2d(in_channels, out_channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1, no biases (the code's q/k/v and output projections)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
                         nn.Conv2d(in_channels, out_channels, 1, bias=False))


class RelativePositionBias(nn.Module):
    """Learned 2D relative position bias between the 8 x 8 key grid and every query position (paper Eq. 5)."""

    def __init__(self, heads: int, size: int):
        super().__init__()
        self.size = size
        self.table = nn.Parameter(torch.randn((2 * size - 1) ** 2, heads) * 0.02)
        rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, s*s)
        delta = coords[:, :, None] - coords[:, None, :] + (size - 1)  # (2, s*s, s*s), shifted to start at 0
        self.register_buffer("index", delta[0] * (2 * size - 1) + delta[1], persistent=False)

    def forward(self, height: int, width: int) -> torch.Tensor:
        s = self.size
        bias = self.table[self.index.flatten()].view(s, s, s * s, -1)  # (query cell row, col, key, heads)
        # each query position takes its 8 x 8 cell's row: the table is repeated by whole cells
        bias = bias.repeat_interleave(height // s, dim=0).repeat_interleave(width // s, dim=1)
        return bias.reshape(height * width, s * s, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, HW, s*s)


class EfficientAttention(nn.Module):
    """Multi-head attention with keys / values resized to 8 x 8 (paper Eq. 3) and a relative position bias."""

    def __init__(self, query_channels: int, key_channels: int, heads: int = HEADS, reduce_size: int = REDUCE_SIZE):
        super().__init__()
        self.heads, self.reduce_size = heads, reduce_size
        self.head_channels = query_channels // heads  # inner width = the query width (code: dim_head = C / heads)
        self.scale = self.head_channels ** -0.5
        self.position = RelativePositionBias(heads, reduce_size)
        self.attention_dropout = nn.Dropout(DROPOUT)
        self.out = nn.Sequential(SeparableConv(query_channels, query_channels), nn.Dropout(DROPOUT))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, _, h, w = t.shape  # channels are (head_channels, heads), head-minor as the code's rearrange
        return t.reshape(b, self.head_channels, self.heads, h * w).permute(0, 2, 3, 1)  # (B, heads, hw, d)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b, _, h, w = query.shape
        if key.shape[-2:] != (self.reduce_size, self.reduce_size):
            key, value = (F.interpolate(t, size=self.reduce_size, mode="bilinear", align_corners=True)
                          for t in (key, value))
        scores = self._split_heads(query) @ self._split_heads(key).transpose(-2, -1)  # (B, heads, HW, s*s)
        scores = (scores + self.position(h, w)) * self.scale  # the code adds the bias before scaling
        weights = self.attention_dropout(scores.softmax(dim=-1))
        attended = weights @ self._split_heads(value)  # (B, heads, HW, d)
        return self.out(attended.permute(0, 3, 1, 2).reshape(b, -1, h, w))


class SelfAttention(EfficientAttention):
    def __init__(self, channels: int):
        super().__init__(channels, channels)
        self.qkv = SeparableConv(channels, 3 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.qkv(x).chunk(3, dim=1))


class CrossAttention(EfficientAttention):
    """Decoder attention (paper Sec. 2.3): queries from the skip, keys / values from the coarser map."""

    def __init__(self, coarse_channels: int, skip_channels: int):
        super().__init__(skip_channels, coarse_channels)
        self.query = SeparableConv(skip_channels, skip_channels)
        self.key_value = SeparableConv(coarse_channels, 2 * skip_channels)

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.attend(self.query(skip), *self.key_value(coarse).chunk(2, dim=1))


def _feed_forward(channels: int) -> nn.Sequential:
    # code: "conv1x1 has no difference with mlp in performance"
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False))


class TransformerEncoderBlock(nn.Module):
    """Paper Fig. 1c: BN, self-attention, residual; BN-ReLU-conv1x1, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.attention = SelfAttention(channels)
        self.feed_forward = _feed_forward(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm(x))
        return x + self.feed_forward(x)


class TransformerDecoderBlock(nn.Module):
    """Paper Fig. 1d: the skip attends to the coarser map; residual = the coarser map, 1x1 conv, upsampled."""

    def __init__(self, coarse_channels: int, skip_channels: int):
        super().__init__()
        self.residual = nn.Conv2d(coarse_channels, skip_channels, 1)
        self.norm_coarse = nn.BatchNorm2d(coarse_channels)
        self.norm_skip = nn.BatchNorm2d(skip_channels)
        self.attention = CrossAttention(coarse_channels, skip_channels)
        self.feed_forward = _feed_forward(skip_channels)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        residual = F.interpolate(self.residual(coarse), size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = residual + self.attention(self.norm_skip(skip), self.norm_coarse(coarse))
        return x + self.feed_forward(x)


class AttentionUp(nn.Module):
    """Code `up_block_trans` (num_block 0): decoder attention, concatenation with the skip, one basic block."""

    def __init__(self, coarse_channels: int, skip_channels: int):
        super().__init__()
        self.decode = TransformerDecoderBlock(coarse_channels, skip_channels)
        self.fuse = PreActBasicBlock(2 * skip_channels, skip_channels)

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([self.decode(coarse, skip), skip], dim=1))


class ConvUp(nn.Module):
    """Code `up_block` (level 0): bilinear x2, 1x1 conv, concatenation [skip, up], two basic blocks."""

    def __init__(self, coarse_channels: int, skip_channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(coarse_channels, skip_channels, 1)
        self.fuse = nn.Sequential(PreActBasicBlock(2 * skip_channels, skip_channels),
                                  PreActBasicBlock(skip_channels, skip_channels))

    def forward(self, coarse: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.reduce(F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True))
        return self.fuse(torch.cat([skip, up], dim=1))


CARD = NetworkCard(paper="Gao, Zhou, Metaxas, UTNet: A Hybrid Transformer Architecture for Medical Image "
                         "Segmentation, MICCAI 2021", size_multiple=128, default_size=256, paper_num_classes=4,
                   head="heads")


@register_model("utnet", CARD)
class UTNet(SegmentationNetwork):
    """UTNet: pre-activation residual U-Net with efficient self-attention at 1/2..1/16 and attention decoders."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1, base_channels: int = BASE_CHANNELS,
                 deep_supervision: bool = True):
        super().__init__()
        c = base_channels
        self.deep_supervision = deep_supervision
        self.stem = nn.Sequential(PreActBasicBlock(in_channels, c), PreActBasicBlock(c, c))
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), PreActBasicBlock(c * 2 ** i, c * 2 ** (i + 1)),
                          TransformerEncoderBlock(c * 2 ** (i + 1))) for i in range(4))
        self.up = nn.ModuleList([AttentionUp(16 * c, 8 * c), AttentionUp(8 * c, 4 * c), AttentionUp(4 * c, 2 * c),
                                 ConvUp(2 * c, c)])
        # the main 1x1 conv (code outc), then the 1/8, 1/4, 1/2 decoder maps' side outputs (code out1..out3)
        widths = (c, 8 * c, 4 * c, 2 * c) if deep_supervision else (c,)
        self.heads = nn.ModuleList(nn.Conv2d(w, num_classes, 1) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = [self.stem(x)]
        for level in self.down:
            skips.append(level(skips[-1]))
        out = skips.pop()
        sides = []
        for up in self.up:
            out = up(out, skips.pop())
            sides.append(out)
        main = self.heads[0](out)
        if not (self.training and self.deep_supervision):
            return main
        side_logits = [F.interpolate(head(feature), size=x.shape[-2:], mode="bilinear", align_corners=True)
                       for head, feature in zip(self.heads[1:], sides)]  # 1/8, 1/4, 1/2
        return [main, *side_logits[::-1]]  # the code's order: main, 1/2, 1/4, 1/8
