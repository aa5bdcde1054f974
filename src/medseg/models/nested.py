"""Nested U-Nets: UNet++ and ANU-Net (Li et al., "ANU-Net: Attention-based nested U-Net to
exploit full resolution features for medical image segmentation", Computers & Graphics 2020).

Topology (ANU-Net Sec. 3.1-3.3, Eq. 4, Figs. 4-5). Node X_{i,j} at depth i:
- encoder: X_{i,0} = Phi(MaxPool(X_{i-1,0})), X_{0,0} = Phi(input);
- nested: X_{i,j} = Phi([A_0, ..., A_{j-1}, U]) for j >= 1, where U = ConvTranspose2x2(X_{i+1,j-1})
  ("deconvolution", Sec. 3.3) and A_k is X_{i,k} itself (UNet++) or X_{i,k} passed through its own
  attention gate gated by U (ANU-Net: a distinct gate for every (node, skip) pair, 20 in L4, F_int = F/2);
- Phi = [3x3 conv (bias) - BN - ReLU] x 2; filters 32-64-128-256-512 (the paper lists none; the
  published parameter counts fix base 32: ours);
- deep supervision (Sec. 3.4): a 1x1 head on each of X_{0,1..4}; training returns all four (main first:
  [Y4, Y3, Y2, Y1]), evaluation returns the head of `level`.

Pruning (Sec. 3.5, Fig. 7): "ANU-Net L_N" keeps the nodes with i + j <= N, their gates and up-convs, and
head N. `forward(x, level=N)` computes only those nodes; `prune(N)` deletes the rest, so a model saved
afterwards is smaller and rebuilds pruned (`level`, `pruned` are stored in its config.json).

Parameter counts, in = 3 (only head N counted, as the paper's Table 6 counts a pruned network), against
Table 6: L1 103,188 vs 0.1038M (-0.6 %), L2 520,829 vs 0.5134M (+1.4 %), L3 2,245,503 vs 2.1918M (+2.5 %),
L4 9,203,741 vs 8.9506M (+2.8 %). No plausible configuration reproduces all four published numbers
(we searched ~660k); this one follows the paper's text. The unpruned network with its four
deep-supervision heads has 9,203,840. UNet++ (Zhou et al., DLMIA 2018) is the same graph without gates:
ours uses BN and transposed-conv upsampling like ANU-Net, so the two differ only by the gates.

`unetpp_stsnet`: UNet++ as STS-Net's Table 1 counts it (36.62M): filters 64-1024 (`base_channels=64`), x2 bilinear
upsampling (align_corners) instead of the transposed conv (`upsample="bilinear"`: node X_{i,j} concatenates j skips
of width F_i and the up-sampled F_{i+1}-wide X_{i+1,j-1}), one head, no gates: 36,629,698 parameters with 3 in and
2 classes (+0.03 %). This is the widely used PyTorch form of UNet++ (conv-BN-ReLU blocks, bilinear up) at the
classic U-Net widths; STS-Net's released code holds no baselines, so the form is identified by its count (ours).
"""

from __future__ import annotations

import torch
from torch import nn

from medseg.errors import MedsegError
from medseg.models.base import Gated, NetworkCard, Prunable, SegmentationNetwork
from medseg.models.blocks import AttentionGate, DoubleConv
from medseg.models.registry import register_model

FILTERS = (32, 64, 128, 256, 512)
UPSAMPLING = ("transpose", "bilinear")
DEPTH = 4


def _nodes(level: int) -> list[tuple[int, int]]:
    """(i, j) of every node with i + j <= level, in an order where each node's inputs come first."""
    return [(i, j) for j in range(level + 1) for i in range(level + 1 - j)]


class NestedUNet(Prunable, Gated, SegmentationNetwork):
    groups = {"encoder": tuple(f"blocks.x{i}0" for i in range(DEPTH + 1))}  # the backbone column X_{i,0}
    levels = tuple(range(1, DEPTH + 1))

    def __init__(self, in_channels: int = 3, num_classes: int = 1, attention: bool = True,
                 deep_supervision: bool = True, level: int = DEPTH, pruned: bool = False, base_channels: int = 32,
                 upsample: str = "transpose"):
        super().__init__()
        if upsample not in UPSAMPLING:
            raise MedsegError(f"unknown upsample {upsample!r}; choose one of {', '.join(UPSAMPLING)}")
        filters = [base_channels * 2**i for i in range(DEPTH + 1)]
        if not 1 <= level <= DEPTH:
            raise MedsegError(f"level must be 1..{DEPTH}, got {level}")
        if level < DEPTH and not pruned:
            raise MedsegError("a nested U-Net below level 4 exists only as a pruned trained network; "
                              "build level 4 and prune it")
        self.attention = attention
        self.deep_supervision = deep_supervision
        self.level = level
        self.pruned = pruned
        self.pool = nn.MaxPool2d(2)
        self.blocks = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.gates = nn.ModuleDict()
        for i, j in _nodes(level):
            width = filters[i]
            if j == 0:
                self.blocks[f"x{i}{j}"] = DoubleConv(in_channels if i == 0 else filters[i - 1], width, bias=True)
                continue
            if upsample == "transpose":
                self.up[f"x{i}{j}"], up_width = nn.ConvTranspose2d(filters[i + 1], width, 2, stride=2), width
            else:  # no parameters: the deeper node keeps its width
                self.up[f"x{i}{j}"], up_width = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), \
                    filters[i + 1]
            self.blocks[f"x{i}{j}"] = DoubleConv(j * width + up_width, width, bias=True)
            if attention:
                for k in range(j):
                    self.gates[f"x{i}{j}_{k}"] = AttentionGate(up_width, width, width // 2)
        head_levels = [level] if pruned or not deep_supervision else range(1, level + 1)
        self.heads = nn.ModuleDict({f"y{j}": nn.Conv2d(filters[0], num_classes, 1) for j in head_levels})

    def forward_heads(self, x: torch.Tensor, level: int) -> dict[int, torch.Tensor]:
        """Logits of every head up to `level`, computing only the nodes with i + j <= level."""
        if not 1 <= level <= self.level:
            raise ValueError(f"level must be 1..{self.level} for this network, got {level}")
        nodes: dict[tuple[int, int], torch.Tensor] = {}
        for i, j in _nodes(level):
            name = f"x{i}{j}"
            if j == 0:
                nodes[i, 0] = self.blocks[name](x if i == 0 else self.pool(nodes[i - 1, 0]))
                continue
            up = self.up[name](nodes[i + 1, j - 1])
            skips = [self.gates[f"{name}_{k}"](up, nodes[i, k]) if self.attention else nodes[i, k] for k in range(j)]
            nodes[i, j] = self.blocks[name](torch.cat([*skips, up], dim=1))
        return {j: self.heads[f"y{j}"](nodes[0, j]) for j in range(1, level + 1) if f"y{j}" in self.heads}

    def forward(self, x: torch.Tensor, level: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        level = self.level if level is None else level
        if f"y{level}" not in self.heads:
            raise ValueError(f"this network has no head at level {level} (heads: {sorted(self.heads)}); "
                             "prune a full network to that level instead")
        heads = self.forward_heads(x, level)
        if self.training and len(heads) > 1:
            return [heads[j] for j in sorted(heads, reverse=True)]
        return heads[level]

    def pruned_options(self, level: int) -> dict[str, int | bool]:
        """ANU-Net L_level keeps the nodes with i + j <= level, their gates and up-convs, and head `level`."""
        if f"y{level}" not in self.heads:
            levels = sorted(int(name[1:]) for name in self.heads if name[1:].isdigit())
            raise MedsegError(f"cannot prune to level {level}: this network has levels "
                              f"{', '.join(map(str, levels)) or 'none'} (pruning needs deep supervision, and a pruned "
                              "network cannot grow back); choose --level among them")
        return {"level": level, "pruned": True}

    def first_layer_gates(self) -> dict[str, AttentionGate]:
        """The gates on the skips into the output node X_{0,level} (ANU-Net Fig. 12)."""
        return {f"x0{self.level}_from_x0{k}": self.gates[f"x0{self.level}_{k}"]
                for k in range(self.level) if f"x0{self.level}_{k}" in self.gates}


ANUNET = NetworkCard(
    paper="Li et al., ANU-Net: Attention-based nested U-Net to exploit full resolution features for medical image "
          "segmentation, Computers & Graphics 2020",
    size_multiple=16, default_size=256, head="heads")
UNETPP = NetworkCard(
    paper="Zhou et al., UNet++: A Nested U-Net Architecture for Medical Image Segmentation, DLMIA 2018 "
          "(in ANU-Net's configuration)",
    size_multiple=16, default_size=256, head="heads")


@register_model("anunet", ANUNET, attention=True)
@register_model("unetpp", UNETPP, attention=False)
class ANUNet(NestedUNet):
    """Nested U-Net (filters 32-512, deep supervision, prunable); `anunet` adds an attention gate per skip."""


UNETPP_STSNET = NetworkCard(
    paper="Zhou et al., UNet++: A Nested U-Net Architecture for Medical Image Segmentation, DLMIA 2018 "
          "(at STS-Net Table 1's 36.62M: filters 64-1024, bilinear upsampling)",
    size_multiple=16, default_size=512, paper_num_classes=2, head="heads")


@register_model("unetpp_stsnet", UNETPP_STSNET, attention=False, base_channels=64, upsample="bilinear",
                deep_supervision=False)
class UNetPPWide(NestedUNet):
    """UNet++ at the classic U-Net widths (64-1024) with bilinear upsampling and one head (STS-Net's baseline)."""
