"""CentroidNetV2 (Dijkstra, van de Loosdrecht, Atsma, Schomaker & Wiering, "CentroidNetV2: A hybrid deep neural
network for small-object segmentation and counting", Neurocomputing 423, 2021), a baseline of STS-Net's Table 1
(Sci. Rep. 2025: 31.03M parameters), pinned down from the authors' code (kdijkstra13/OpenCentroidNetV2:
centroidnet/centroidnet_core.py, centroidnet/postprocess.py, centroidnet/dataloaders.py, centroidnet/backbones/unet.py,
train.py, config.py).

- Backbone (code `CentroidNetV2` -> `UNet(num_classes + 4, depth=5, start_filts=64)`): a U-Net WITHOUT batch
  normalisation: per level two 3x3 convs with bias and ReLU, widths 64-1024, 2x2 max pooling, 2x2 transposed-conv
  up-sampling that halves the channels, concatenation (up first, skip second), and a 1x1 output conv. Weights start
  Xavier-normal with zero biases (code `weight_init`, applied to Conv2d only; transposed convs keep PyTorch's
  default).
- Output (code): `num_classes + 4` channels: 2 centroid-vector and 2 border-vector channels (dy, dx), then the class
  logits (background first, softmax). `forward` returns the class logits, the segmentation medseg scores;
  `vector_fields(x)` returns the four vector channels for the counting use of the network.
- Vector targets (code `encode` and postprocess.py `calc_centroid_and_border_vectors`), built by `vector_targets`
  from each training batch's mask:
  - Instances: the code draws one annotated ellipse per object; a semantic mask has no instance ids, so ours are the
    8-connected components of each foreground class (as medseg.engine.postprocess counts objects). Objects of
    one class that touch are one instance.
  - Border pixels (code `binary_edge_detector`): instance pixels whose 2x2 window to the lower right or to the upper
    left holds another id, the outside of the image counting as background.
  - Centroid vector: from EVERY pixel (background included) to the nearest instance centroid (the mean of the
    instance's pixel coordinates). Border vector: from the pixel to the nearest border pixel of that same instance.
  - Where the border vector is longer than `max_dist`, both vectors are 0 (so far background learns to vote for
    nothing); all vectors are divided by `max_dist` (code config.py: 40). An image without objects has zero targets.
  - Ties (two centroids or border pixels at the same distance): the code takes the first in its order, ours the one
    scipy's distance transform / k-d tree returns; the vectors differ in direction only, not in length.
  - Ours: the code derives the targets on the whole image and then crops; medseg gives the network's loss the
    already cropped (or resized) mask, so a crop's edge counts as a border and an object cut by it gets the centroid
    of its visible part.
  - Cost: scipy on the CPU, image by image, after each training forward (labelling, one exact distance transform,
    k-d tree queries for the pixels within `max_dist` of a border only); measured on two shared CPU cores:
    0.2-0.5 s for a batch of 20 polyp-like 256 x 256 masks (one to five blobs each), 0.14 s for 20
    100 x 100 crops. It runs inside the training step (the mask is copied to the CPU after the forward),
    not in a data-loader worker, so on a GPU it adds to each step's time.
- Loss (code `CentroidLossV2`): mean over all pixels of the Euclidean distance between output and target vectors,
  once for the centroid and once for the border vectors, plus softmax cross-entropy of the logits, all weight 1.
  The recipe's loss is the cross-entropy; `extra_losses(mask)` gives {"centroid", "border"} from the vector channels
  cached by the last training-mode forward, weighted by the recipe's `train.extra_loss_weights`. The norm is
  `torch.linalg.vector_norm` (the code's sqrt of the summed squares; its gradient at a zero error is 0, not NaN).
  medseg's validation loss (which picks the best checkpoint) is the cross-entropy only; the code's adds the vector
  terms (ours).

Parameters (3 in, num_classes 2, i.e. 6 output channels): 31,032,070, the reference code's count; the STS-Net
table's 31.03M. The 4 vector channels are 4 x 65 = 260 of them. Inputs: any multiple of 16.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from torch import nn

from medseg.models.base import ExtraLosses, NetworkCard, SegmentationNetwork
from medseg.models.registry import register_model

VECTOR_CHANNELS = 4  # centroid (dy, dx) and border (dy, dx) vectors, in the code's order before the logits
DEPTH = 5
MAX_DIST = 40.0  # code config.py `max_dist`: vectors longer than this are zeroed, all are divided by it
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# (dy, dx) neighbours the code's edge detector compares a pixel with: its lower-right and upper-left 2x2 windows
BORDER_NEIGHBOURS = ((0, 1), (1, 0), (1, 1), (0, -1), (-1, 0), (-1, -1))

CARD = NetworkCard(
    paper="Dijkstra, van de Loosdrecht, Atsma, Schomaker & Wiering, CentroidNetV2: A hybrid deep neural network "
          "for small-object segmentation and counting, Neurocomputing 2021",
    size_multiple=2 ** (DEPTH - 1), default_size=256, paper_num_classes=2)


def instance_map(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(H, W) class labels -> (instance ids 1..count, 0 for the background; count): the 8-connected components of
    each foreground class, class by class."""
    instances = np.zeros(labels.shape, dtype=np.int32)
    count = 0
    for label in np.unique(labels[labels > 0]):
        components, found = ndimage.label(labels == label, structure=EIGHT_CONNECTED)
        inside = components > 0
        instances[inside] = components[inside] + count
        count += found
    return instances, count


def border_pixels(instances: np.ndarray) -> np.ndarray:
    """(H, W) bool: the instance pixels next to another id (the image's outside counts as background 0)."""
    height, width = instances.shape
    padded = np.pad(instances, 1)
    border = np.zeros(instances.shape, dtype=bool)
    for dy, dx in BORDER_NEIGHBOURS:
        border |= padded[1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width] != instances
    return border & (instances > 0)


def vector_targets(labels: np.ndarray, max_dist: float = MAX_DIST) -> np.ndarray:
    """(H, W) class labels -> (4, H, W) float32: centroid (dy, dx) and border (dy, dx) vectors over `max_dist`,
    zero where the border vector is longer than `max_dist` (see the module docstring)."""
    targets = np.zeros((VECTOR_CHANNELS, *labels.shape), dtype=np.float32)
    instances, count = instance_map(labels)
    if count == 0:
        return targets
    border = border_pixels(instances)
    # the nearest border pixel of any instance; a pixel farther than max_dist from all borders is zeroed anyway
    distance, nearest_yx = ndimage.distance_transform_edt(~border, return_indices=True)
    band = distance <= max_dist
    pixels = np.argwhere(band)
    nearest = nearest_yx[:, band].T
    centroids = np.array(ndimage.center_of_mass(np.ones(labels.shape), instances, np.arange(1, count + 1)))
    owner = cKDTree(centroids).query(pixels)[1]  # index of the nearest centroid
    # where the nearest border is another instance's, look up the nearest border pixel of the owner itself
    foreign = instances[nearest[:, 0], nearest[:, 1]] != owner + 1
    for index in np.unique(owner[foreign]):
        rows = np.flatnonzero(foreign & (owner == index))
        own_border = np.argwhere(border & (instances == index + 1))
        nearest[rows] = own_border[cKDTree(own_border).query(pixels[rows])[1]]
    border_vectors = nearest - pixels
    kept = np.sqrt((border_vectors ** 2).sum(axis=1)) <= max_dist
    y, x = pixels[kept].T
    targets[0:2, y, x] = (centroids[owner[kept]] - pixels[kept]).T / max_dist
    targets[2:4, y, x] = border_vectors[kept].T / max_dist
    return targets


def vector_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The code's vector loss: the mean over pixels of the Euclidean distance of (B, 2, H, W) vector fields."""
    return torch.linalg.vector_norm(output - target, dim=1).mean()


class PlainDoubleConv(nn.Sequential):
    """Two 3x3 convs with bias, each followed by ReLU (no normalisation, as the code)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


@register_model("centroidnet_v2", CARD)
class CentroidNetV2(SegmentationNetwork, ExtraLosses):
    """CentroidNetV2: a plain (no BN) U-Net 64-1024 whose head adds centroid and border vector fields to the logits."""

    groups = {"encoder": ("encoder",), "head": ("head",)}

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base_channels: int = 64,
                 max_dist: float = MAX_DIST):
        super().__init__()
        if max_dist <= 0:
            raise ValueError(f"max_dist must be positive (the vector targets are divided by it), got {max_dist}")
        widths = [base_channels * 2 ** i for i in range(DEPTH)]
        self.num_classes = num_classes
        self.max_dist = float(max_dist)
        self.encoder = nn.ModuleList(PlainDoubleConv(in_channels if i == 0 else widths[i - 1], widths[i])
                                     for i in range(DEPTH))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                      for i in reversed(range(DEPTH - 1)))
        self.decoder = nn.ModuleList(PlainDoubleConv(2 * widths[i], widths[i]) for i in reversed(range(DEPTH - 1)))
        self.head = nn.Conv2d(widths[0], VECTOR_CHANNELS + num_classes, 1)
        for module in self.modules():  # the code initialises its Conv2d layers only
            if type(module) is nn.Conv2d:
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def all_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4 + num_classes, H, W): the code's output, vector fields first."""
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.decoder):
            x = block(torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)

    def vector_fields(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4, H, W): centroid then border vectors, in units of the code's `max_dist`."""
        return self.all_outputs(x)[:, :VECTOR_CHANNELS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self.all_outputs(x)
        self.keep_for_losses(outputs[:, :VECTOR_CHANNELS])  # the vector channels, for extra_losses
        return outputs[:, VECTOR_CHANNELS:]

    def extra_losses(self, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The code's centroid and border vector errors of the last training forward against targets derived from
        `mask` (N, H, W labels); the cached vectors are released."""
        vectors = self.take_kept()
        targets = np.stack([vector_targets(labels, self.max_dist) for labels in mask.cpu().numpy()])
        targets = torch.from_numpy(targets).to(vectors.device)
        vectors = vectors.float()  # under autocast: the errors are summed in fp32
        return {"centroid": vector_error(vectors[:, :2], targets[:, :2]),
                "border": vector_error(vectors[:, 2:], targets[:, 2:])}
