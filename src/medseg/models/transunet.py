"""TransUNet (Chen et al., "TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation",
arXiv:2102.04306, 2021), a baseline of M2SNet's medical-general comparison (arXiv:2303.10894, Sec. 4.4), pinned down
from the paper (Sec. 3.2-3.3, Fig. 1) and the authors' code (Beckschen/TransUNet: networks/vit_seg_modeling.py,
vit_seg_modeling_resnet_skip.py, vit_seg_configs.py `get_r50_b16_config`, train.py, trainer.py).

- Encoder (paper Sec. 3.2 "CNN-Transformer hybrid"; code `ResNetV2(block_units=(3, 4, 9))` + ViT-B/16): timm's
  `vit_base_r50_s16_224`, the same R50-ViT-B/16 hybrid: a BiT ResNet-50 cut after its third stage (weight-
  standardised convs, GroupNorm), a 1x1 patch embedding 1024 -> 768 on its 1/16 map, 12 pre-norm transformer
  layers (12 heads, MLP 3072, LayerNorm eps 1e-6), a final LayerNorm. Dropout 0.1 on the embeddings and in the
  MLPs, none in the attention (code `dropout_rate`, `attention_dropout_rate`).
- Tokens (code `Embeddings`): one per 1/16 position, plus a learnt position embedding; there is NO class token.
  `img_size` (code `--img_size`, 224) fixes the position-embedding grid; another input size resamples it
  bilinearly (timm's `resample_abs_pos_embed`; ours: the code only resamples when it loads weights).
- Cascaded upsampler (paper Sec. 3.3, code `DecoderCup`): the tokens back to a (768, H/16, W/16) map, a 3x3
  conv-BN-ReLU to 512, then four blocks [x2 bilinear (align_corners, as nn.UpsamplingBilinear2d), concatenate the
  skip, two 3x3 conv-BN-ReLU] with 256/128/64/16 channels; skips (n_skip = 3) are the 1/8 (512 ch), 1/4 (256) and
  1/2 (64, the stem before its max pool) CNN features; the last block has none. Head: a 3x3 conv to the classes.
- Pretrained slot (the paper starts from ImageNet-21k R50+ViT-B_16): the `encoder` module keeps timm's key layout,
  so a local timm `vit_base_r50_s16_224` file (e.g. the `orig_in21k` weights, which expect mean = std = 0.5)
  loads with `encoder_weights: PATH`. To keep that layout the encoder holds timm's `pos_embed` with its class
  entry (skipped by the forward, as the code's `load_from` drops it) and timm's `cls_token` as a buffer.

Differences from the authors' code, both inside timm's implementation of the same hybrid: its ResNet convs use
'same' padding (the code pads the odd-sized skips instead), and the projection shortcut's GroupNorm has 32 groups
(the original JAX BiT/ViT code; the PyTorch port uses one group per channel: same parameter count).

Parameters: the authors' code builds 105,277,081 for its Synapse setting (224 px, 9 classes; counted by running
networks/vit_seg_modeling.py) and 105,276,066 for 2 classes; ours has those + 768, the class entry of the position
embedding (0.0007 %), pinned in tests/test_baselines_b18c.py. M2SNet's Table 6 lists TransUNet at "93.2" (its
"Params (MB)" column, millions): the authors' network at M2SNet's 352 px and 1 class has 105,497,105, and
93,230,545 without its StdConv2d kernels, GroupNorms and position embedding, i.e. what a per-module-type counter
such as thop reports for it (it matches nn.Conv2d only by exact type). We pin the true count.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from medseg.models.base import EncoderCard, NetworkCard, SegmentationNetwork
from medseg.models.blocks import ConvBNReLU
from medseg.models.registry import register_model

ENCODER = "vit_base_r50_s16_224"
PATCH = 16  # the hybrid's token stride
HIDDEN_TO_DECODER = 512  # code `DecoderCup.head_channels`
DECODER_CHANNELS = (256, 128, 64, 16)  # code `get_r50_b16_config().decoder_channels`
SKIP_CHANNELS = (512, 256, 64, 0)  # code `skip_channels` with n_skip = 3: 1/8, 1/4, 1/2, none
DROPOUT = 0.1  # code `transformer.dropout_rate`


class CascadedUpsamplerBlock(nn.Module):
    """x2 bilinear upsampling, concatenation with the skip (if any), two 3x3 conv-BN-ReLU (code `DecoderBlock`)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(in_channels + skip_channels, out_channels),
                                   ConvBNReLU(out_channels, out_channels))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.convs(x if skip is None else torch.cat([x, skip], dim=1))


CARD = NetworkCard(
    paper="Chen et al., TransUNet: Transformers Make Strong Encoders for Medical Image Segmentation, "
          "arXiv:2102.04306, 2021",
    size_multiple=PATCH, default_size=224, paper_num_classes=9, head="head",
    encoder=EncoderCard(family="timm", name=ENCODER, module="encoder",
                        first_conv="patch_embed.backbone.stem.conv.weight", normalize="mean 0.5, std 0.5 (orig_in21k)"),
    paper_weights="ImageNet-21k R50+ViT-B_16 (the authors' code loads R50+ViT-B_16.npz)")


@register_model("transunet", CARD)
class TransUNet(SegmentationNetwork):
    """TransUNet: R50-ViT-B/16 hybrid encoder (timm) with a cascaded upsampler over three CNN skips."""

    def __init__(self, in_channels: int = 3, num_classes: int = 9, img_size: int = 224):
        super().__init__()
        self.encoder = timm.create_model(ENCODER, pretrained=False, num_classes=0, img_size=img_size,
                                         in_chans=in_channels, pos_drop_rate=DROPOUT, proj_drop_rate=DROPOUT)
        for block in self.encoder.blocks:  # the code drops in the MLP only, not after the attention projection
            block.attn.proj_drop = nn.Identity()
        class_token = self.encoder.cls_token.detach().clone()
        del self.encoder.cls_token  # kept as a buffer for the file layout; TransUNet has no class token
        self.encoder.register_buffer("cls_token", class_token)
        self.grid = (img_size // PATCH, img_size // PATCH)
        hidden = self.encoder.embed_dim
        self.bottleneck = ConvBNReLU(hidden, HIDDEN_TO_DECODER)
        widths = (HIDDEN_TO_DECODER, *DECODER_CHANNELS)
        self.decoder = nn.ModuleList(CascadedUpsamplerBlock(widths[i], SKIP_CHANNELS[i], widths[i + 1])
                                     for i in range(len(DECODER_CHANNELS)))
        self.head = nn.Conv2d(DECODER_CHANNELS[-1], num_classes, 3, padding=1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 768, H/16, W/16) transformer features and the skips [1/8, 1/4, 1/2]."""
        backbone = self.encoder.patch_embed.backbone
        half = backbone.stem.norm(backbone.stem.conv(x))  # 64 ch at 1/2, before the stem's max pool
        quarter = backbone.stages[0](backbone.stem.pool(half))
        eighth = backbone.stages[1](quarter)
        patches = self.encoder.patch_embed.proj(backbone.norm(backbone.stages[2](eighth)))
        height, width = patches.shape[-2:]
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = self.encoder.pos_drop(tokens + self.position_embedding(height, width))
        tokens = self.encoder.norm(self.encoder.blocks(tokens))
        features = tokens.transpose(1, 2).reshape(x.shape[0], -1, height, width)
        return features, [eighth, quarter, half]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        grid = self.encoder.pos_embed[:, 1:]  # timm's layout holds a class entry first: TransUNet skips it
        if (height, width) == self.grid:
            return grid
        return resample_abs_pos_embed(grid, new_size=[height, width], old_size=list(self.grid), num_prefix_tokens=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, skips = self.encode(x)
        x = self.bottleneck(features)
        for block, skip in zip(self.decoder, [*skips, None]):
            x = block(x, skip)
        return self.head(x)
