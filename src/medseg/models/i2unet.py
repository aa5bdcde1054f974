"""I2U-Net (Dai et al., "I2U-Net: A dual-path U-Net with rich information interaction for medical image
segmentation", Medical Image Analysis 97, 103241, 2024), a baseline of STS-Net's Table 1 (Sci. Rep. 2025), pinned down
from the authors' code (duweidai/I2U-Net: Models/I2U_Net.py class I2U_Net_M, Models/mfii_resnet.py
MFII_resnet34_M, train_and_test_isic.py). The medium model is the one whose count is STS-Net's "27.49M".

- Two paths (paper Sec. 3): an image path (a ResNet-34 layout) and a 32-channel information path h that runs
  beside it from 1/4 to 1/32 and back, started at zeros (code `h_init_type m_0`).
- Encoder (code `MFII_ResNet_M` with `MFII_BasicBlock`, layers 3-4-6-3): 7x7/2 conv-BN-ReLU, 3x3/2 max pool; each
  basic block's first 3x3 conv reads [x, h] concatenated; BN-ReLU-conv-BN, ECA channel attention (kernel 5, 5, 5, 7
  per stage), residual (1x1/2 conv-BN projection where the shape changes), ReLU; h is 2x2 average-pooled in a
  stage's first (strided) block. After every block the information path takes h = tanh(BN(h + conv1x1(out))), one
  1x1 conv (no bias) per stage and one BN per block. The code's `y` aliases the block output that its in-place
  residual add and ReLU then change, so the path reads the block's output (as here). Convs: Kaiming normal
  (fan_out), as the code; its ImageNet-style classifier (`fc`, 545,000 parameters) and a BatchNorm of the path
  (`bn2`, 64) are never called and left out.
- Centre (code `HIFA_V2`, the paper's hybrid information fusion): on [e4, h4] (544 ch) a non-local block whose keys
  and values are one token set: a 1x1 conv-BN-ReLU to 272 ch, the max pools (1/2, 2/2, 3/3, 4/4 kernel/stride)
  flattened, plus the sum of ReLU'd 1x1 and 3x3 (dilation 1, 2, 3) convs (biases zeroed) flattened; queries from a
  separate 1x1 conv-BN-ReLU; softmax(q k^T / sqrt(272)) v; a zero-initialised 1x1 conv back to 544 ch, residual.
  Then DropBlock (rate 0.2, 2x2 blocks, training only; code `Drop`) and the split back into e4 and h4.
- Decoder (code `MFII_DecoderBlock_V2`, ECA kernels 7, 5, 5, 5): on [d, h] a 1x1 conv to C/4, BN-ReLU, a 3x3/2
  transposed conv, BN-ReLU, a 1x1 conv, BN, ECA, plus the input through a 3x3/2 transposed conv, ReLU; the path
  h = tanh(BN(deconv3x3/2(h) + conv1x1(out))). Encoder features and paths are added after each block (d + e,
  h + e_h) at 1/16, 1/8, 1/4; the last block reaches 1/2.
- Head: [d0, h0] -> 4x4/2 transposed conv to 32 ch, ReLU, 3x3 conv to the classes. The code applies a sigmoid to its
  two output maps and then a softmax CE + Dice on them; medseg returns logits (ours: the losses act on logits).

Parameters (3 in, 1 out): 26,949,069 = the reference code's I2U_Net_M(classes=1) count 27,494,133 (STS-Net Table 1:
27.49M) less its two unused modules, the classifier fc (544 x 1000 + 1000) and bn2 (2 x 32). Inputs: multiples of
32, at least 128 px (the centre pools the 1/32 map 4 x 4). Checked against the reference code (its weights copied
across, eval mode): sigmoid of the output equals the code's output to 6e-8 at 128 x 160.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.base import NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

PATH_CHANNELS = 32  # code: rla_channel 32
STAGE_BLOCKS = (3, 4, 6, 3)  # ResNet-34
STAGE_WIDTHS = (64, 128, 256, 512)
ENCODER_ECA = (5, 5, 5, 7)  # code: MFII_resnet34_M k_size
DECODER_ECA = (7, 5, 5, 5)  # code: I2U_Net_M decoder4..decoder1
DROP_RATE, DROP_BLOCK = 0.2, 2  # code: Drop(drop_rate=0.2, block_size=2)
SPP_POOLS = ((1, 2), (2, 2), (3, 3), (4, 4))  # (kernel, stride) of the centre's token pools
SPP_DILATIONS = (2, 3)  # the 3x3 convs beside the 1x1 and the plain 3x3
MIN_SIZE = 128  # the centre's 4 x 4 max pool needs a 1/32 map of at least 4 x 4


class ECA(nn.Module):
    """Efficient channel attention: global average, a 1D conv across channels (no bias), sigmoid gate."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.conv(x.mean(dim=(2, 3))[:, None, :])  # (B, 1, C)
        return x * torch.sigmoid(weights).transpose(1, 2)[..., None]


class PathBasicBlock(nn.Module):
    """ResNet basic block whose first conv also reads the information path h (code MFII_BasicBlock)."""

    def __init__(self, in_channels: int, channels: int, stride: int, eca_kernel: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + PATH_CHANNELS, channels, 3, stride, 1, bias=False), nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
            ECA(eca_kernel))
        projected = stride != 1 or in_channels != channels
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(channels)) if projected else nn.Identity()
        self.pool_path = nn.AvgPool2d(2) if projected and stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.body(torch.cat([x, h], dim=1)) + self.shortcut(x))
        return out, self.pool_path(h)


class PathStage(nn.Module):
    """One ResNet stage; after every block h = tanh(BN(h + conv1x1(block output)))."""

    def __init__(self, in_channels: int, channels: int, blocks: int, stride: int, eca_kernel: int):
        super().__init__()
        self.blocks = nn.ModuleList(PathBasicBlock(in_channels if i == 0 else channels, channels,
                                                   stride if i == 0 else 1, eca_kernel) for i in range(blocks))
        self.to_path = nn.Conv2d(channels, PATH_CHANNELS, 1, bias=False)  # shared by the stage's blocks (code)
        self.path_norms = nn.ModuleList(nn.BatchNorm2d(PATH_CHANNELS) for _ in range(blocks))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block, norm in zip(self.blocks, self.path_norms):
            x, h = block(x, h)
            h = torch.tanh(norm(h + self.to_path(x)))
        return x, h


class DualPathEncoder(nn.Module):
    """Code MFII_ResNet_M (ResNet-34 with the information path), without its unused classifier."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        inputs = (64, *STAGE_WIDTHS[:-1])
        self.stages = nn.ModuleList(PathStage(i, w, n, 1 if k == 0 else 2, e) for k, (i, w, n, e) in enumerate(
            zip(inputs, STAGE_WIDTHS, STAGE_BLOCKS, ENCODER_ECA)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = self.stem(x)
        h = x.new_zeros(x.shape[0], PATH_CHANNELS, *x.shape[-2:])  # code h_init_type m_0
        features, paths = [], []
        for stage in self.stages:
            x, h = stage(x, h)
            features.append(x)
            paths.append(h)
        return features, paths


class PyramidTokens(nn.Module):
    """Code SPP_inception_block_v2: max-pooled tokens plus summed multi-dilation conv tokens, (B, N, C)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pools = nn.ModuleList(nn.MaxPool2d(k, s) for k, s in SPP_POOLS)
        self.convs = nn.ModuleList([nn.Conv2d(channels, channels, 1), nn.Conv2d(channels, channels, 3, padding=1),
                                    *(nn.Conv2d(channels, channels, 3, padding=d, dilation=d) for d in SPP_DILATIONS)])
        for conv in self.convs:
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [pool(x).flatten(2) for pool in self.pools]
        convolved = sum(F.relu(conv(x)) for conv in self.convs).flatten(2)
        return torch.cat([*pooled, convolved], dim=2).transpose(1, 2)


class HybridFusion(nn.Module):
    """Code HIFA_V2: a non-local block with pyramid keys = values, zero-initialised output, residual."""

    def __init__(self, channels: int):
        super().__init__()
        inner = channels // 2
        self.value = nn.Sequential(nn.Conv2d(channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU())
        self.query = nn.Sequential(nn.Conv2d(channels, inner, 1), nn.BatchNorm2d(inner), nn.ReLU())
        self.tokens = PyramidTokens(inner)
        self.out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        values = self.tokens(self.value(x))  # (B, N, C'), also the keys
        queries = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C')
        weights = torch.softmax(queries @ values.transpose(1, 2) * values.shape[-1] ** -0.5, dim=-1)
        context = (weights @ values).transpose(1, 2).reshape(b, -1, h, w)
        return x + self.out(context)


class DropBlock(nn.Module):
    """Code `Drop`: zero 2x2 blocks around seeds drawn at rate / block^2, rescale by kept fraction (training only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        seeds = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < DROP_RATE / DROP_BLOCK ** 2).to(x.dtype)
        dropped = F.max_pool2d(seeds, DROP_BLOCK, stride=1, padding=DROP_BLOCK // 2)[..., :-1, :-1]
        keep = 1 - dropped
        return x * keep * keep.numel() / keep.sum().clamp(min=1)


def _up(in_channels: int, out_channels: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)


class PathDecoderBlock(nn.Module):
    """Code MFII_DecoderBlock_V2: x2 upsampling of the image path and of the information path."""

    def __init__(self, in_channels: int, out_channels: int, eca_kernel: int):
        super().__init__()
        inner = in_channels // 4
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + PATH_CHANNELS, inner, 1), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            _up(inner, inner), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, out_channels, 1), nn.BatchNorm2d(out_channels), ECA(eca_kernel))
        self.shortcut = _up(in_channels, out_channels)
        self.up_path = _up(PATH_CHANNELS, PATH_CHANNELS)
        self.to_path = nn.Conv2d(out_channels, PATH_CHANNELS, 1, bias=False)
        self.path_norm = nn.BatchNorm2d(PATH_CHANNELS)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = F.relu(self.body(torch.cat([x, h], dim=1)) + self.shortcut(x))
        return out, torch.tanh(self.path_norm(self.up_path(h) + self.to_path(out)))


CARD = NetworkCard(paper="Dai et al., I2U-Net: A dual-path U-Net with rich information interaction for medical "
                         "image segmentation, Medical Image Analysis 2024 (the code's I2U_Net_M)",
                   size_multiple=32, default_size=224, paper_num_classes=2)


@register_model("i2unet", CARD)
class I2UNet(SegmentationNetwork):
    """I2U-Net (medium): dual-path ResNet-34 encoder, hybrid information fusion centre, dual-path decoder."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1):
        super().__init__()
        self.encoder = DualPathEncoder(in_channels)
        self.fusion = HybridFusion(STAGE_WIDTHS[-1] + PATH_CHANNELS)
        self.drop = DropBlock()
        widths = (*STAGE_WIDTHS[::-1], STAGE_WIDTHS[0])  # 512 -> 256 -> 128 -> 64 -> 64
        self.decoder = nn.ModuleList(PathDecoderBlock(widths[i], widths[i + 1], DECODER_ECA[i]) for i in range(4))
        self.head = nn.Sequential(nn.ConvTranspose2d(STAGE_WIDTHS[0] + PATH_CHANNELS, 32, 4, 2, 1),
                                  nn.ReLU(inplace=True), nn.Conv2d(32, num_classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"i2unet needs inputs of at least {MIN_SIZE} px (its centre max-pools the 1/32 map "
                             f"4 x 4), got {tuple(x.shape[-2:])}")
        features, paths = self.encoder(x)
        centre = self.drop(self.fusion(torch.cat([features[-1], paths[-1]], dim=1)))
        d, h = centre.split([STAGE_WIDTHS[-1], PATH_CHANNELS], dim=1)
        for level, block in enumerate(self.decoder):
            d, h = block(d, h)
            if level < 3:  # encoder features and paths at 1/16, 1/8, 1/4
                d, h = d + features[2 - level], h + paths[2 - level]
        return self.head(torch.cat([d, h], dim=1))
