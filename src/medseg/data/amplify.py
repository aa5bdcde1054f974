"""STS-Net's amplification blocks (Scientific Reports 2025, Methods Eq. 1-2, Table 7 "Method 4"; the authors'
code, zlxokok/STSNet 2_5D/): more, and larger, views of the training images whose lesions are small. Offline,
training images only.

Thresholds, from the training masks: A = number of images with a lesion, S = their total lesion pixels,
N1 = ceil(sqrt(S / A))^2 and N2 = ceil(sqrt(N1 / 2))^2 (SCCM-2022 gives 2025 and 1024, as Table 7).
An image qualifies when 5 < lesion pixels < N2. Each qualifying image gets five new views:
- four standard ones: vertical flip, horizontal flip, a 50-px border crop resized back, flip + crop;
- one lesion-centred crop: the mask is dilated with a 2x2 kernel only to locate the lesion; its centre is
  the centre of the bounding box of the largest connected component (ours: the code takes the first
  OpenCV contour's minimum-area rectangle, an arbitrary choice among lesions); half-extents are drawn
  from 150..160 px and clamped to the image, the crop resized back to the image size.
Images are resized bilinearly, masks with nearest neighbour; the mask written is the original (not the
dilated) one, unlike the code (ours). Random draws are seeded per image. For images
too small for a 50-px border (the paper's images are 480-512 px), the border is clamped to a quarter of
the shorter side (ours).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torchvision.transforms import InterpolationMode, v2

from medseg.data.formats import Case, Layout, discover
from medseg.data.io import mask_to_labels, read_mask, read_raw_image, write_image_atomic
from medseg.data.transforms import resize_mask
from medseg.errors import MedsegError
from medseg.files import atomic_folder

MIN_LESION_PIXELS = 5  # "5 < lesion pixels < N2"
CENTRE_HALF_EXTENT = (150, 160)
STANDARD = ("vflip", "hflip", "crop", "hflip_crop")


@dataclass(frozen=True)
class Thresholds:
    n1: int | None
    n2: int
    lesion_images: int | None  # A
    lesion_pixels: int | None  # S
    source: str


def compute_thresholds(lesion_counts: list[int]) -> Thresholds:
    """N1 = ceil(sqrt(S/A))^2 and N2 = ceil(sqrt(N1/2))^2 over the images that have a lesion."""
    with_lesion = [c for c in lesion_counts if c > 0]
    if not with_lesion:
        raise MedsegError("no training mask has a lesion, so N1 and N2 cannot be computed; give --n2 explicitly")
    a, s = len(with_lesion), int(sum(with_lesion))
    n1 = math.ceil(math.sqrt(s / a)) ** 2
    n2 = math.ceil(math.sqrt(n1 / 2)) ** 2
    return Thresholds(n1, n2, a, s, f"computed from {len(lesion_counts)} training masks")


@dataclass(frozen=True)
class AmplifiedCase:
    """A derived training view: the source case plus the operation and its drawn parameters."""

    case: Case
    op: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return f"{self.case.stem}_amp_{self.op}"


def qualifies(lesion_pixels: int, thresholds: Thresholds) -> bool:
    return MIN_LESION_PIXELS < lesion_pixels < thresholds.n2


def lesion_centre(labels: np.ndarray) -> tuple[int, int]:
    """Centre (row, col) of the bounding box of the largest lesion, found on the 2x2-dilated mask."""
    dilated = ndimage.binary_dilation(labels > 0, structure=np.ones((2, 2), bool))
    components, count = ndimage.label(dilated)
    sizes = np.bincount(components.ravel())[1:]
    rows, cols = np.nonzero(components == 1 + int(np.argmax(sizes)))
    return (int(rows.min()) + int(rows.max()) + 1) // 2, (int(cols.min()) + int(cols.max()) + 1) // 2


def plan_case(case: Case, labels: np.ndarray, rng: np.random.Generator, border: int = 50) -> list[AmplifiedCase]:
    """The five views of one qualifying image, with every random draw made now (so they are reproducible)."""
    height, width = labels.shape
    crop = min(border, min(height, width) // 4)
    c_h, c_w = lesion_centre(labels)
    h_s = max(1, min(int(rng.integers(*CENTRE_HALF_EXTENT, endpoint=True)), c_h, height - c_h))
    w_s = max(1, min(int(rng.integers(*CENTRE_HALF_EXTENT, endpoint=True)), c_w, width - c_w))
    box = {"top": c_h - h_s, "bottom": c_h + h_s, "left": c_w - w_s, "right": c_w + w_s}
    border_box = {"top": crop, "bottom": height - crop, "left": crop, "right": width - crop}
    return [AmplifiedCase(case, "vflip"), AmplifiedCase(case, "hflip"), AmplifiedCase(case, "crop", border_box),
            AmplifiedCase(case, "hflip_crop", border_box), AmplifiedCase(case, "centre", {**box, "centre": [c_h, c_w]})]


def apply(view: AmplifiedCase, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a view to an image (C, H, W) float and its labels (H, W); output keeps the input size."""
    size = list(mask.shape[-2:])
    if view.op == "vflip":
        return image.flip(-2), mask.flip(-2)
    if view.op in ("hflip", "hflip_crop"):
        image, mask = image.flip(-1), mask.flip(-1)
    if view.op == "hflip":
        return image, mask
    box = view.params
    image = image[..., box["top"]:box["bottom"], box["left"]:box["right"]]
    mask = mask[..., box["top"]:box["bottom"], box["left"]:box["right"]]
    image = v2.functional.resize(image, size, InterpolationMode.BILINEAR, antialias=True)
    return image, resize_mask(mask, tuple(size))


def plan(layout: Layout, stems: list[str], thresholds: Thresholds | None, num_classes: int = 1,
         mask_threshold: int | None = None, seed: int = 0,
         border: int = 50) -> tuple[Thresholds, list[AmplifiedCase], dict[str, int]]:
    """Thresholds (computed from these training cases unless given), the views, and lesion pixels per stem."""
    by_stem = {c.stem: c for c in layout.cases + layout.test_cases}
    labels = {s: mask_to_labels(read_mask(by_stem[s].mask), num_classes, mask_threshold, by_stem[s].mask)
              for s in stems}
    lesions = {s: int(np.count_nonzero(m)) for s, m in labels.items()}
    thresholds = thresholds or compute_thresholds(list(lesions.values()))
    views = []
    for index, stem in enumerate(stems):
        if qualifies(lesions[stem], thresholds):
            views += plan_case(by_stem[stem], labels[stem], np.random.default_rng([seed, index]), border)
    return thresholds, views, lesions


def manifest(thresholds: Thresholds, views: list[AmplifiedCase], lesions: dict[str, int], seed: int,
             border: int) -> dict:
    qualifying = sorted({v.case.stem for v in views})
    return {
        "thresholds": asdict(thresholds), "seed": seed, "border": border,
        "rule": f"{MIN_LESION_PIXELS} < lesion pixels < N2 = {thresholds.n2}",
        "training_images": len(lesions), "qualifying_images": len(qualifying), "new_images": len(views),
        "views": [{"stem": v.stem, "source": v.case.stem, "op": v.op, "params": v.params,
                   "source_lesion_pixels": lesions[v.case.stem]} for v in views],
    }


def amplify_folder(data: str | Path, out: str | Path, n1: int | None = None, n2: int | None = None, seed: int = 0,
                   border: int = 50) -> dict:
    """`medseg amplify`: copy a folder-format dataset to `out` with the amplified training views added.

    With a `splits.json`, thresholds and views come from its train stems only and the new views join the
    train split; otherwise every image counts as training data. Writes `out/amplify.json`.
    """
    layout = discover(data)
    if layout.kind != "folder":
        raise MedsegError(f"medseg amplify writes the folder format; {data} is an nnU-Net layout")
    out = Path(out)
    if out.exists():
        raise MedsegError(f"{out} exists; amplify writes a new folder, so give another --out or remove it")
    splits_file = layout.root / "splits.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else None
    stems = sorted(splits["train"]) if splits else sorted(c.stem for c in layout.cases)
    given = Thresholds(n1, n2, None, None, "given on the command line") if n2 is not None else None
    thresholds, views, lesions = plan(layout, stems, given, seed=seed, border=border)
    with atomic_folder(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for case in layout.cases:
            shutil.copy2(case.images[0], tmp / "images" / case.images[0].name)
            shutil.copy2(case.mask, tmp / "masks" / case.mask.name)
        for view in views:
            _write_view(view, tmp)
        if splits:
            splits["train"] = sorted(splits["train"] + [v.stem for v in views])
            (tmp / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        record = {"source": str(layout.root.resolve()), **manifest(thresholds, views, lesions, seed, border)}
        (tmp / "amplify.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _write_view(view: AmplifiedCase, root: Path) -> None:
    raw = read_raw_image(view.case.images[0])
    mask = read_mask(view.case.mask)
    image = torch.from_numpy(raw.astype(np.float32)).permute(2, 0, 1)
    image, labels = apply(view, image, torch.from_numpy(mask.astype(np.int64)))
    pixels = image.permute(1, 2, 0).round().clamp(0, np.iinfo(raw.dtype).max if raw.dtype.kind == "u" else None)
    write_image_atomic(root / "images" / f"{view.stem}.png", pixels.numpy().astype(raw.dtype))
    write_image_atomic(root / "masks" / f"{view.stem}.png", labels.numpy().astype(mask.dtype))
