"""STS-Net's amplification blocks (Scientific Reports 2025, "Amplification blocks", Eq. 1-2, Table 7 and
"Effect of amplification methods"; the authors' code, zlxokok/STSNet 2_5D/): more, and larger, views of the
training images whose lesions are small. Offline, training images only.

Sizes are counted at the training size (the paper amplifies its 480 / 512 px training images; here the
recipe's `data.size`, or `--size`, default 512): each mask is resized there with nearest neighbour before its
lesion pixels are counted, so a 40 x 40 lesion of a 2048-px image is a 10 x 10 lesion at 512. The pixel
lengths below (the 50-px border, the 150-160 px half-extents) are training-size pixels too, scaled to each
image's own size (ours: the paper's lengths are meant for 480-512 px images). Views are written at the
image's own size; training resizes them like any other image.

Thresholds, from the training masks: A = number of images with a lesion, S = their total lesion pixels,
N1 = ceil(sqrt(S / A))^2 (Eq. 1) and N2 = ceil(sqrt(N1 / 2))^2 (Eq. 2) (SCCM-2022 gives 2025 and 1024, as
Table 7). An image qualifies when 5 < lesion pixels < the method's limit (the 5 is the code's lower bound).

The "normal amplification" (four standard views): vertical flip, horizontal flip, a border crop resized
back, horizontal flip + the same crop. The border is 50 px on all four sides (the paper also names
top-and-bottom-only and left-right-only crops; its "four standard augmentations" have one crop and one flip
crop, and the authors' BUSI script crops all four sides, so we do). The four Table 7 methods:
- Method 1: the four standard views of every image with 5 < lesion pixels < N1.
- Method 2: the same under N2.
- Method 3: Method 2, then "additional cropping ... after applying the above augmentations" for the views
  whose lesion "remains smaller than N2 after the initial augmentation" ("double quantity normal
  magnification", Table 7): every standard view whose lesion, counted at the training size, is still
  5 < pixels < N2 is cropped once more by the same border (vflip -> vflip_crop, crop -> crop_crop,
  hflip_crop -> hflip_crop_crop). Ours: the cropped hflip view is the hflip_crop view already there (the
  border crop is symmetric, so flip and crop commute), so it is not written twice: 5 to 7 views per image,
  not 8. A crop that cuts the lesion out (5 or fewer pixels left) is not cropped again.
- Method 4 (the paper's final STS-Net, "The method we employed is Method 4", the default): Method 2 plus one
  lesion-centred crop, 5 views per image. The Methods section and the ablation text say Method 4 builds on
  Method 3, but the Table 7 caption ("adding center amplification on method 2") and Implementation details
  ("four standard augmentations and one center crop ... expanded into six images") say Method 2 and give the
  count, so we follow them. The centre crop: the mask is dilated with a 2x2 kernel only to locate the lesion;
  its centre is the centre of the bounding box of the largest connected component (ours: the code takes the
  first OpenCV contour's minimum-area rectangle, an arbitrary choice among lesions); half-extents are drawn
  from 150..160 px and clamped to the image, the crop resized back to the image size.
Images are resized bilinearly, masks with nearest neighbour; the mask written is the original (not the
dilated) one, unlike the code (ours). Random draws are seeded per image. For training sizes too small for a
50-px border (the paper's are 480-512 px), the border is clamped to a quarter of the shorter side (ours).
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
METHODS = {1: "the four standard views under N1", 2: "the four standard views under N2",
           3: "method 2, and a further crop of each standard view still under N2",
           4: "method 2 and a lesion-centred crop"}
TRAINING_SIZE = (512, 512)  # the paper's training size (480 for SCCM-2022)


@dataclass(frozen=True)
class Thresholds:
    n1: int | None
    n2: int
    lesion_images: int | None  # A
    lesion_pixels: int | None  # S
    source: str


def n2_of(n1: int) -> int:
    """Eq. 2: N2 = ceil(sqrt(N1 / 2))^2."""
    return math.ceil(math.sqrt(n1 / 2)) ** 2


def compute_thresholds(lesion_counts: list[int]) -> Thresholds:
    """N1 = ceil(sqrt(S/A))^2 and N2 = ceil(sqrt(N1/2))^2 over the images that have a lesion."""
    with_lesion = [c for c in lesion_counts if c > 0]
    if not with_lesion:
        raise MedsegError("no training mask has a lesion, so N1 and N2 cannot be computed; give --n2 explicitly")
    a, s = len(with_lesion), int(sum(with_lesion))
    n1 = math.ceil(math.sqrt(s / a)) ** 2
    return Thresholds(n1, n2_of(n1), a, s, f"computed from {len(lesion_counts)} training masks")


def given_thresholds(n1: int | None, n2: int | None, source: str) -> Thresholds | None:
    """Thresholds the user gave (N2 from N1 by Eq. 2 when only N1 is given), or None to compute them."""
    if n1 is None and n2 is None:
        return None
    return Thresholds(n1, n2 if n2 is not None else n2_of(n1), None, None, source)


@dataclass(frozen=True)
class AmplifiedCase:
    """A derived training view: the source case, the operation ("_"-joined steps applied in order: vflip,
    hflip, crop, centre) and its drawn parameters (the crop box, in the source image's pixels)."""

    case: Case
    op: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return f"{self.case.stem}_amp_{self.op}"


def limit_of(method: int, thresholds: Thresholds) -> int:
    """The method's size limit: N1 for Method 1, N2 for the others."""
    if method not in METHODS:
        raise MedsegError(f"amplification method {method} does not exist; choose 1, 2, 3 or 4 (paper Table 7)")
    if method == 1 and thresholds.n1 is None:
        raise MedsegError("method 1 amplifies images under N1, but only N2 was given; give N1 too (or neither)")
    return thresholds.n1 if method == 1 else thresholds.n2


def qualifies(lesion_pixels: int, limit: int) -> bool:
    return MIN_LESION_PIXELS < lesion_pixels < limit


def training_pixels(labels: np.ndarray | torch.Tensor, size: tuple[int, int]) -> int:
    """Lesion pixels of a label mask once resized (nearest neighbour) to the training size."""
    labels = torch.as_tensor(labels)
    return int(torch.count_nonzero(resize_mask(labels, size)))


def lesion_centre(labels: np.ndarray) -> tuple[int, int]:
    """Centre (row, col) of the bounding box of the largest lesion, found on the 2x2-dilated mask."""
    dilated = ndimage.binary_dilation(labels > 0, structure=np.ones((2, 2), bool))
    components, count = ndimage.label(dilated)
    sizes = np.bincount(components.ravel())[1:]
    rows, cols = np.nonzero(components == 1 + int(np.argmax(sizes)))
    return (int(rows.min()) + int(rows.max()) + 1) // 2, (int(cols.min()) + int(cols.max()) + 1) // 2


def plan_case(case: Case, labels: np.ndarray, rng: np.random.Generator, method: int, thresholds: Thresholds,
              size: tuple[int, int] = TRAINING_SIZE, border: int = 50) -> list[AmplifiedCase]:
    """The views of one qualifying image, with every random draw made now (so they are reproducible).
    Lengths are training-size pixels (`size`), scaled to this image's own size."""
    height, width = labels.shape
    scale_h, scale_w = height / size[0], width / size[1]
    crop = min(border, min(size) // 4)
    crop_h, crop_w = round(crop * scale_h), round(crop * scale_w)
    border_box = {"top": crop_h, "bottom": height - crop_h, "left": crop_w, "right": width - crop_w}
    views = [AmplifiedCase(case, op, border_box if "crop" in op else {}) for op in STANDARD]
    if method == 3:
        limit, mask, written = limit_of(method, thresholds), torch.from_numpy(labels), set(STANDARD)
        for view in list(views):
            if f"{view.op}_crop" not in written and qualifies(training_pixels(transform(view, mask, True), size),
                                                              limit):
                views.append(AmplifiedCase(case, f"{view.op}_crop", border_box))
                written.add(f"{view.op}_crop")
    if method == 4:
        c_h, c_w = lesion_centre(labels)
        h_s = round(int(rng.integers(*CENTRE_HALF_EXTENT, endpoint=True)) * scale_h)
        w_s = round(int(rng.integers(*CENTRE_HALF_EXTENT, endpoint=True)) * scale_w)
        h_s, w_s = max(1, min(h_s, c_h, height - c_h)), max(1, min(w_s, c_w, width - c_w))
        box = {"top": c_h - h_s, "bottom": c_h + h_s, "left": c_w - w_s, "right": c_w + w_s, "centre": [c_h, c_w]}
        views.append(AmplifiedCase(case, "centre", box))
    return views


def transform(view: AmplifiedCase, tensor: torch.Tensor, is_mask: bool) -> torch.Tensor:
    """A view's steps on one tensor (..., H, W): flips, and crops of the view's box resized back to (H, W),
    bilinear for images, nearest neighbour for masks."""
    size = list(tensor.shape[-2:])
    for step in view.op.split("_"):
        if step == "vflip":
            tensor = tensor.flip(-2)
        elif step == "hflip":
            tensor = tensor.flip(-1)
        else:  # crop, centre: the box, resized back
            box = view.params
            tensor = tensor[..., box["top"]:box["bottom"], box["left"]:box["right"]]
            tensor = (resize_mask(tensor, tuple(size)) if is_mask
                      else v2.functional.resize(tensor, size, InterpolationMode.BILINEAR, antialias=True))
    return tensor


def apply(view: AmplifiedCase, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a view to an image (C, H, W) float and its labels (H, W); output keeps the input size."""
    return transform(view, image, False), transform(view, mask, True)


def plan(layout: Layout, stems: list[str], thresholds: Thresholds | None, num_classes: int = 1,
         mask_threshold: int | None = None, seed: int = 0, border: int = 50, method: int = 4,
         size: tuple[int, int] = TRAINING_SIZE) -> tuple[Thresholds, list[AmplifiedCase], dict[str, int]]:
    """Thresholds (computed from these training cases unless given), the views, and lesion pixels per stem,
    all counted at the training size `size`."""
    by_stem = {c.stem: c for c in layout.cases + layout.test_cases}
    labels = {s: mask_to_labels(read_mask(by_stem[s].mask), num_classes, mask_threshold, by_stem[s].mask)
              for s in stems}
    lesions = {s: training_pixels(m, size) for s, m in labels.items()}
    thresholds = thresholds or compute_thresholds(list(lesions.values()))
    limit = limit_of(method, thresholds)
    views = []
    for index, stem in enumerate(stems):
        if qualifies(lesions[stem], limit):
            views += plan_case(by_stem[stem], labels[stem], np.random.default_rng([seed, index]), method,
                               thresholds, size, border)
    return thresholds, views, lesions


def manifest(thresholds: Thresholds, views: list[AmplifiedCase], lesions: dict[str, int], seed: int,
             border: int, method: int = 4, size: tuple[int, int] = TRAINING_SIZE) -> dict:
    qualifying = sorted({v.case.stem for v in views})
    limit = f"{'N1' if method == 1 else 'N2'} = {limit_of(method, thresholds)}"
    return {
        "method": method, "description": METHODS[method], "size": list(size),
        "thresholds": asdict(thresholds), "seed": seed, "border": border,
        "rule": f"{MIN_LESION_PIXELS} < lesion pixels at {size[0]}x{size[1]} < {limit}",
        "training_images": len(lesions), "qualifying_images": len(qualifying), "new_images": len(views),
        "views": [{"stem": v.stem, "source": v.case.stem, "op": v.op, "params": v.params,
                   "source_lesion_pixels": lesions[v.case.stem]} for v in views],
    }


def amplify_folder(data: str | Path, out: str | Path, n1: int | None = None, n2: int | None = None, seed: int = 0,
                   border: int = 50, method: int = 4, size: int | tuple[int, int] = TRAINING_SIZE[0]) -> dict:
    """`medseg amplify`: copy a folder-format dataset to `out` with the amplified training views added.

    With a `splits.json`, thresholds and views come from its train stems only and the new views join the
    train split; otherwise every image counts as training data. Lesions are counted at `size` (the training
    size). Writes `out/amplify.json`.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    layout = discover(data)
    if layout.kind != "folder":
        raise MedsegError(f"medseg amplify writes the folder format; {data} is an nnU-Net layout")
    out = Path(out)
    if out.exists():
        raise MedsegError(f"{out} exists; amplify writes a new folder, so give another --out or remove it")
    splits_file = layout.root / "splits.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else None
    stems = sorted(splits["train"]) if splits else sorted(c.stem for c in layout.cases)
    given = given_thresholds(n1, n2, "given on the command line")
    thresholds, views, lesions = plan(layout, stems, given, seed=seed, border=border, method=method, size=size)
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
        record = {"source": str(layout.root.resolve()), **manifest(thresholds, views, lesions, seed, border, method,
                                                                    size)}
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
