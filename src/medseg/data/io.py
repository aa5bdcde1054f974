"""Reading images and masks from disk, and turning raw mask values into class labels.

Images come back as float32 (H, W, C) in [0, 1], scaled by the range of the stored dtype (not by the
image's own maximum), so that intensities mean the same thing in every image of a dataset. Masks come
back as the raw stored integers; `mask_to_labels` decides how to read them and refuses ambiguous ones.

A file that cannot be used raises `FileError`, whose message names the file; `without_path` is the same message
without the name, which `check-data` shows beside the file and groups across files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from medseg.errors import MedsegError
from medseg.files import atomic_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTENSIONS = (".tif", ".tiff")
JPEG_EXTENSIONS = (".jpg", ".jpeg")

# ITU-R BT.601 luma weights: the usual RGB -> gray conversion (Pillow's "L" uses the same).
BT601_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# A TIFF axis this long or shorter is read as channels; longer ones are slices of a stack.
MAX_CHANNELS = 4
# How many offending mask values an error message lists before it says "...".
MAX_LISTED_VALUES = 8
NON_FINITE_ADVICE = ("a network fed them outputs NaN, and trains to NaN weights: replace them (numpy.nan_to_num) "
                     "and save the image again, or remove it from the dataset")

# Pillow modes that are converted before turning into an array (everything else is an error).
_PILLOW_TO_RGB = {"P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_PILLOW_TO_GRAY = {"LA", "La"}
_PILLOW_16BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


# Files given where a 2D image is expected, by what they are and what to do instead (`non_2d_format`).
_SLICES = ("turn volumes into 2D image/mask slices with `medseg slices VOLUMES --out DATA` (a network trained on "
           "them predicts volumes given in a call of their own)")
_NON_2D_FORMATS = {
    (".nii", ".nii.gz"): f"a NIfTI volume, not a 2D image; {_SLICES}",
    (".nrrd", ".nhdr", ".mha", ".mhd"): f"a NRRD/MetaImage volume, not a 2D image; {_SLICES}",
    (".dcm", ".dicom"): "a DICOM file, which medseg does not read as a 2D image; export the image as PNG or 16-bit "
                        f"TIFF (a DICOM series: put its folder in VOLUMES/images/ and {_SLICES})",
    (".npy", ".npz"): "a NumPy array, which medseg does not read; save it as TIFF (float32 is kept) or PNG",
}


@dataclass(frozen=True)
class SettingNames:
    """How messages name the mask settings: recipe keys when training, flags in `medseg check-data`."""

    num_classes: str = "model.num_classes"
    mask_threshold: str = "data.mask_threshold"


RECIPE_KEYS = SettingNames()


class FileError(MedsegError):
    """A user error about one file: the message names it, `without_path` is the same message without the name.

    Constructible from the message alone, as a DataLoader worker re-raises it."""

    def __init__(self, message: str, without_path: str | None = None):
        super().__init__(message)
        self.without_path = without_path or message


def file_error(subject: str, path: Path, rest: str) -> FileError:
    """FileError("<subject> <path><rest>"), e.g. file_error("mask", path, " is a colour image; ...")."""
    return FileError(f"{subject} {path}{rest}", f"{subject}{rest}")


class MaskValueError(MedsegError):
    """A mask holds values that the configured mask mode cannot interpret."""


def _one_line(exc: BaseException) -> str:
    """The exception text as one line (decoders sometimes put newlines in their messages)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def non_2d_format(path: str | Path) -> str | None:
    """What a volume, DICOM or NumPy file is and what to do instead ("a NIfTI volume, not a 2D image; ..."),
    or None for any other file."""
    name = Path(path).name.lower()
    return next((advice for endings, advice in _NON_2D_FORMATS.items() if name.endswith(endings)), None)


def _refuse_non_2d(path: Path, what: str) -> None:
    advice = non_2d_format(path)
    if advice is not None:
        raise file_error(f"cannot read {what}", path, f": it is {advice}")


def _cannot_read(what: str, path: Path, exc: BaseException) -> FileError:
    """The error for a file a decoder refused: an empty or unreadable file says so, anything else gets the
    decoder's reason (without the file name, which the message already has)."""
    advice = "check that the file opens in an image viewer, re-export it, or remove it from the dataset"
    if isinstance(exc, PermissionError):
        reason, advice = "permission denied", "make it readable (chmod a+r) or remove it from the dataset"
    elif isinstance(exc, IsADirectoryError):
        reason, advice = "it is a folder, not a file", "give the image files inside it"
    elif isinstance(exc, FileNotFoundError):
        reason, advice = "the file does not exist", "check the path (a broken link?)"
    elif path.is_file() and path.stat().st_size == 0:
        reason, advice = "the file is empty (0 bytes)", "export it again or remove it from the dataset"
    else:
        reason = _one_line(exc).replace(repr(str(path)), "").replace(str(path), "").replace(" :", ":").strip()
        reason = reason.rstrip(":") or type(exc).__name__
    return file_error(f"cannot read {what}", path, f": {reason}; {advice}")


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_EXTENSIONS


def _tiff_layout(shape: tuple[int, ...], axes: str, path: Path, what: str) -> tuple[tuple[int, ...], str]:
    """Squeeze a TIFF series shape to (H, W) or (H, W, C); returns the squeezed shape and its axes.

    tifffile names the channel axis "S" (samples per pixel); a generic leading axis (several pages)
    is accepted as channels only while it is short, otherwise it is a stack of slices.
    """
    kept = [(n, a) for n, a in zip(shape, axes) if n != 1]
    dims = tuple(n for n, _ in kept)
    names = "".join(a for _, a in kept)
    if len(dims) == 2:
        return dims, "YX"
    if len(dims) == 3:
        if names.endswith("S") and dims[2] <= MAX_CHANNELS:
            return dims, "YXS"
        if dims[0] <= MAX_CHANNELS:
            return dims, "SYX"
        if dims[2] <= MAX_CHANNELS:
            return dims, "YXS"
    raise file_error(
        f"cannot read {what}", path, f": TIFF of shape {tuple(shape)} (axes {axes}) is not one 2D image (a multi-page "
        f"stack, or more than {MAX_CHANNELS} channels); medseg reads 2D images, save one 2D slice per file"
    )


def _read_tiff(path: Path, what: str) -> np.ndarray:
    """A TIFF as (H, W) or (H, W, C) in its stored dtype; palette images are expanded to RGB, palette
    masks keep their indices (the index is the label)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes = _tiff_layout(tuple(series.shape), series.axes, path, what)
            photometric = tif.pages[0].photometric
            colormap = tif.pages[0].colormap
            data = series.asarray()
    except MedsegError:
        raise
    except Exception as exc:  # tifffile raises many exception types for damaged files
        raise _cannot_read(what, path, exc) from exc
    if photometric == tifffile.PHOTOMETRIC.SEPARATED:
        raise file_error(f"cannot read {what}", path, ": CMYK TIFF is not supported; convert it to RGB or grayscale")
    data = data.reshape(shape)
    if axes == "SYX":
        data = np.moveaxis(data, 0, -1)
    if photometric == tifffile.PHOTOMETRIC.PALETTE and what == "image" and colormap is not None and data.ndim == 2:
        data = np.moveaxis(colormap[:, data], 0, -1)  # tifffile colormaps are 16-bit RGB
    return data


def _open_pillow(path: Path, what: str, reduce_to: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode a file with Pillow (so truncated files fail here, not later)."""
    try:
        image = Image.open(path)
        if reduce_to is not None and path.suffix.lower() in JPEG_EXTENSIONS:
            image = _draft_jpeg(image, path, reduce_to)
        image.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad files
        raise _cannot_read(what, path, exc) from exc
    return image


def _draft_jpeg(image: Image.Image, path: Path, reduce_to: tuple[int, int]) -> Image.Image:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when that still covers `reduce_to` = (h, w).

    Pillow's draft picks the largest power-of-two scale s with s * w <= W and s * h <= H, so the result
    (ceil(W / s), ceil(H / s)) is never smaller than requested. The caller resizes afterwards and must
    never upsample a reduced decode, so if a Pillow version ever reduced further we decode in full.
    """
    want_h, want_w = reduce_to
    full_size = image.size
    image.draft(None, (want_w, want_h))
    got_w, got_h = image.size
    if image.size != full_size and (got_w < want_w or got_h < want_h):
        image.close()
        return Image.open(path)
    return image


def _pillow_pixels(image: Image.Image, path: Path, what: str) -> np.ndarray:
    """A decoded Pillow image as (H, W) or (H, W, 3) in its stored dtype."""
    mode = image.mode
    if mode in _PILLOW_TO_RGB:
        image = image.convert("RGB")
    elif mode in _PILLOW_TO_GRAY:
        image = image.convert("L")
    elif mode not in {"1", "L", "RGB", "I", "F"} | _PILLOW_16BIT:
        raise file_error(f"cannot read {what}", path,
                         f": unsupported Pillow mode {mode!r}; save it as 8-bit RGB or gray")
    pixels = np.asarray(image)
    if mode in _PILLOW_16BIT:
        pixels = pixels.astype(np.uint16)  # also turns big-endian I;16B into native order
    elif mode == "I":
        # Pillow reads 16-bit gray files as 32-bit "I" in some versions; keep them 16-bit.
        if pixels.size and (pixels.min() < 0 or pixels.max() > np.iinfo(np.uint16).max):
            raise file_error(f"cannot read {what}", path,
                             ": 32-bit integer pixels outside 0..65535; save it as 8- or 16-bit")
        pixels = pixels.astype(np.uint16)
    return pixels


def read_raw_image(path: str | Path, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """An image as (H, W, C) in its stored dtype, C in {1, 3}; alpha dropped, palettes expanded.

    The integrity checker uses this to see bit depths; training code wants `read_image`.
    """
    path = Path(path)
    if reduce_to is not None and (len(reduce_to) != 2 or min(reduce_to) <= 0):
        raise ValueError(f"reduce_to must be two positive sizes (h, w), got {reduce_to}")
    _refuse_non_2d(path, "image")
    if _is_tiff(path):
        pixels = _read_tiff(path, "image")
        if pixels.ndim == 3:
            channels = pixels.shape[2]
            # 2 channels = gray + alpha, 4 channels = RGB + alpha: the alpha channel is dropped.
            pixels = pixels[..., :1] if channels == 2 else pixels[..., :3]
    else:
        pixels = _pillow_pixels(_open_pillow(path, "image", reduce_to), path, "image")
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.dtype.kind not in "buif":  # complex TIFFs, say: no intensity scale to read them by
        raise file_error("cannot read image", path, f": pixels of dtype {pixels.dtype}; save it as 8- or 16-bit")
    if 0 in pixels.shape:
        raise file_error("cannot read image", path, f": it has no pixels (shape {pixels.shape}); export it again")
    return pixels


def count_non_finite(pixels: np.ndarray) -> int:
    """How many NaN or Inf values a floating-point image holds (0 for integer images, which cannot)."""
    if not np.issubdtype(pixels.dtype, np.floating):
        return 0
    return int(pixels.size - np.count_nonzero(np.isfinite(pixels)))


def scale_to_unit(pixels: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] by the dtype's range (uint8 / 255, uint16 / 65535, bool 0/1); floats unchanged."""
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        info = np.iinfo(pixels.dtype)
        if info.min == 0 and info.bits <= 16:
            # float32 represents every 8/16-bit value exactly; skipping float64 halves the cost.
            return pixels.astype(np.float32) / np.float32(info.max)
        span = float(info.max) - float(info.min)
        return ((pixels.astype(np.float64) - float(info.min)) / span).astype(np.float32)
    if np.issubdtype(pixels.dtype, np.floating):
        return pixels.astype(np.float32)
    raise MedsegError(f"images of dtype {pixels.dtype} are not supported; save them as 8- or 16-bit")


def read_image(path: str | Path, reduce_to: tuple[int, int] | None = None) -> np.ndarray:
    """An image as float32 (H, W, C), C in {1, 3}, intensities scaled to [0, 1] by the dtype range.

    `reduce_to=(h, w)`: for JPEGs, decode at the smallest power-of-two reduction that is still at least
    (h, w) on both sides (a large speed-up when training at small sizes); other formats ignore it.
    """
    pixels = read_raw_image(path, reduce_to)
    bad = count_non_finite(pixels)
    if bad:  # refused here too, not only by check-data: predict and evaluate read images without a check
        raise file_error("image", Path(path), f" has {bad} NaN or Inf pixel(s) of {pixels.size}; {NON_FINITE_ADVICE}")
    return scale_to_unit(pixels)


def _single_channel_mask(pixels: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, C) mask -> (H, W) when its colour channels agree; a real colour mask is refused."""
    colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]
    first = colour[..., 0]
    if any(not np.array_equal(first, colour[..., c]) for c in range(1, colour.shape[2])):
        raise file_error("mask", path, " is a colour image; save masks as single-channel label images "
                         "(0/255 or 0/1 for binary, 0..K-1 for K classes)")
    return first


def _integral_mask(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Float or bool masks -> integers, refusing fractional values (a probability map is not a mask)."""
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.floating):
        advice = "save masks as integer label images (0/255 or 0/1 for binary, 0..K-1 for K classes)"
        if count_non_finite(pixels):
            raise file_error("mask", path, f" holds NaN or Inf values; {advice}")
        if not np.array_equal(pixels, np.round(pixels)) or (pixels.size and pixels.min() < 0):
            raise file_error("mask", path, f" holds fractional or negative floating-point values; {advice}")
        top = float(pixels.max()) if pixels.size else 0.0
        return pixels.astype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)
    return pixels


def read_mask(path: str | Path) -> np.ndarray:
    """A mask as a 2-D integer array of the raw stored values (palette masks give palette indices)."""
    path = Path(path)
    _refuse_non_2d(path, "mask")
    if _is_tiff(path):
        pixels = _read_tiff(path, "mask")
    else:
        image = _open_pillow(path, "mask")
        if image.mode in {"1", "L", "P", "RGB", "RGBA", "F"}:
            pixels = np.asarray(image)  # for "P" (VOC-style palette masks) the index is the label
        elif image.mode in {"LA", "PA"}:
            pixels = np.asarray(image)[..., 0]  # drop alpha, keep the gray value or palette index
        elif image.mode in {"I"} | _PILLOW_16BIT:
            pixels = _pillow_pixels(image, path, "mask")
        else:
            pixels = np.asarray(image.convert("RGB"))
    if pixels.ndim == 3:
        pixels = _single_channel_mask(pixels, path)
    if pixels.dtype.kind not in "buif":
        raise file_error("cannot read mask", path, f": values of dtype {pixels.dtype}; save it as 8- or 16-bit")
    return _integral_mask(pixels, path)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header without decoding the pixels."""
    path = Path(path)
    _refuse_non_2d(path, "image")
    try:
        if _is_tiff(path):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = _tiff_layout(tuple(series.shape), series.axes, path, "image")
            return (shape[1], shape[2]) if axes == "SYX" else (shape[0], shape[1])
        with Image.open(path) as image:
            width, height = image.size
        return height, width
    except MedsegError:
        raise
    except Exception as exc:  # decoders raise many exception types for damaged headers
        raise _cannot_read("image", path, exc) from exc


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert an (H, W, C) image between gray (1) and RGB (3); other conversions are refused."""
    have = image.shape[2]
    if have == channels:
        return image
    if have == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if have == 3 and channels == 1:
        luma = image.astype(np.float32, copy=False) @ BT601_LUMA
        return luma[..., None].astype(np.float32, copy=False)
    raise MedsegError(
        f"cannot convert an image with {have} channels to {channels}; medseg converts only between gray (1) "
        f"and RGB (3): set model.in_channels to {have} to use the data as it is"
    )


def distinct_values(raw: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (bincount for 8/16-bit data: much faster than np.unique)."""
    if raw.dtype in (np.uint8, np.uint16):
        counts = np.bincount(raw.ravel(), minlength=1)
        return np.flatnonzero(counts).astype(raw.dtype)
    return np.unique(raw)


def _format_values(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_LISTED_VALUES])
    if len(values) > MAX_LISTED_VALUES:
        return f"{{{shown}, ...}} ({len(values)} distinct values)"
    return f"{{{shown}}}"


def binary_masks(num_classes: int) -> bool:
    """Masks are read as background/foreground for one sigmoid channel and for a two-class softmax head
    (STS-Net): 0/255, 0/1, or thresholded with data.mask_threshold."""
    return num_classes <= 2


def unexpected_mask_values(raw: np.ndarray, num_classes: int, mask_threshold: int | None) -> list[int]:
    """The values that make `mask_to_labels` refuse this mask; empty when the mask is fine.

    Binary mode (1 or 2 classes): the whole value set is the problem ({0, 1, 2} is neither 0/255 nor
    0/1), so every distinct value is returned. Multi-class: only the values outside 0..num_classes-1.
    """
    if num_classes < 1:
        raise MedsegError(f"model.num_classes must be at least 1, got {num_classes}")
    if binary_masks(num_classes) and mask_threshold is not None:
        return []
    values = [int(v) for v in distinct_values(raw)]
    if binary_masks(num_classes):
        present = set(values)
        return [] if present <= {0, 255} or present <= {0, 1} else values
    return [v for v in values if v < 0 or v >= num_classes]


def mask_values_message(path: str | Path | None, values: list[int], num_classes: int,
                        names: SettingNames = RECIPE_KEYS) -> str:
    """The one-line explanation for masks refused by `mask_to_labels` (shared with the checker, which names
    the settings by its flags)."""
    where = f"mask {path}" if path is not None else "mask"
    return _mask_values_message(where, f"values {_format_values(values)}", num_classes, names)


def grouped_mask_values_message(values: list[int], num_classes: int, names: SettingNames) -> tuple[str, str]:
    """(message, detail) for the checker: a short value set stays in the message (masks with the same values
    group), a long one (JPEG noise: a different set in every mask) goes to the detail."""
    if len(values) <= MAX_LISTED_VALUES:
        return _mask_values_message("mask", f"values {_format_values(values)}", num_classes, names), ""
    return (_mask_values_message("mask", f"more than {MAX_LISTED_VALUES} distinct values", num_classes, names),
            f"values {_format_values(values)}")


def _mask_values_message(where: str, shown: str, num_classes: int, names: SettingNames) -> str:
    """`shown`: "values {0, 7}" or "more than 8 distinct values"."""
    if binary_masks(num_classes):
        return (
            f"{where} has {shown}: binary masks must be 0/255 or 0/1; set {names.mask_threshold} "
            f"for noisy masks or {names.num_classes} (> 2) for label masks"
        )
    return (
        f"{where} has {shown} outside the labels 0..{num_classes - 1}; "
        f"fix the mask or set {names.num_classes} to the number of classes including background"
    )


def mask_to_labels(
    raw: np.ndarray, num_classes: int, mask_threshold: int | None, path: str | Path | None = None
) -> np.ndarray:
    """Raw mask values -> uint8 labels (H, W): 0/1 for binary masks, 0..num_classes-1 otherwise.

    Binary (one sigmoid channel, or a two-class softmax head): with `mask_threshold`, foreground is
    raw > threshold (for JPEG-noisy masks); without it only 0/255 or 0/1 masks are accepted, because
    guessing would hide label masks. `mask_threshold` is ignored for masks of three or more classes,
    whose values are the labels themselves.
    """
    if num_classes > 256:
        raise MedsegError(f"model.num_classes is {num_classes}; medseg supports at most 256 classes")
    bad = unexpected_mask_values(raw, num_classes, mask_threshold)
    if bad:
        raise MaskValueError(mask_values_message(path, bad, num_classes))
    if binary_masks(num_classes):
        threshold = 0 if mask_threshold is None else mask_threshold
        return (raw > threshold).astype(np.uint8)
    return raw.astype(np.uint8)


def write_image_atomic(path: str | Path, array: np.ndarray) -> None:
    """Write a PNG (uint8 or uint16 gray, uint8 RGB) through `files.atomic_file`: readers never see half a file.

    16-bit RGB is refused: Pillow has no 48-bit mode, and silently writing 8 bits would lose data.
    """
    path = Path(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"write_image_atomic writes uint8 or uint16 arrays, got {array.dtype}")
    if array.ndim == 3 and (array.shape[2] != 3 or array.dtype != np.uint8):
        raise ValueError(f"write_image_atomic writes gray or 8-bit RGB, got shape {array.shape} {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(f"write_image_atomic expects (H, W) or (H, W, 3), got shape {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))
    with atomic_file(path) as temporary, temporary.open("xb") as stream:
        image.save(stream, format="PNG")


def pixel_spacing(path: str | Path) -> tuple[float, float] | None:
    """(row, column) pixel size in mm from the resolution a file records: a PNG's pHYs chunk in pixels per metre,
    a TIFF's X/YResolution in inch or centimetre units (Pillow reads both as dpi); None when it records none."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            dpi = image.info.get("dpi")
    except Exception as exc:  # Pillow raises many exception types for damaged files
        raise _cannot_read("mask", path, exc) from exc
    if not dpi or len(dpi) != 2 or not all(float(d) > 0 for d in dpi):
        return None
    return 25.4 / float(dpi[1]), 25.4 / float(dpi[0])
