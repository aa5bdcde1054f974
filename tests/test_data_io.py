"""Reading images and masks (medseg.data.io) and finding dataset layouts (medseg.data.formats)."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

from medseg.data.formats import Case, discover, load_case
from medseg.data.io import (
    BT601_LUMA,
    FileError,
    MaskValueError,
    image_size,
    mask_to_labels,
    read_image,
    read_mask,
    read_raw_image,
    to_channels,
    unexpected_mask_values,
    write_image_atomic,
)
from medseg.errors import MedsegError, user_message

# Small Kvasir images (352-401 px high) keep the real-data tests fast; the 1072x1920 one shows JPEG draft.
SMALL_KVASIR = "cju5hi52odyf90817prvcwg45"
LARGE_KVASIR = "cjyzul1qggwwj07216mhiv5sy"


def _rng_pixels(shape, dtype=np.uint8, seed=0):
    high = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, high, size=shape, endpoint=True, dtype=dtype)


# ----------------------------------------------------------------------------- images


def test_rgb_png_is_scaled_by_255(tmp_path):
    pixels = _rng_pixels((12, 17, 3))
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    image = read_image(tmp_path / "rgb.png")
    assert image.dtype == np.float32 and image.shape == (12, 17, 3)
    np.testing.assert_allclose(image, pixels / 255.0, atol=1e-7)
    assert image.max() <= 1.0


def test_gray_png_has_one_channel(tmp_path):
    pixels = _rng_pixels((9, 14))
    Image.fromarray(pixels).save(tmp_path / "gray.png")
    image = read_image(tmp_path / "gray.png")
    assert image.shape == (9, 14, 1)
    np.testing.assert_allclose(image[..., 0], pixels / 255.0, atol=1e-7)


def test_16bit_png_is_scaled_by_65535(tmp_path):
    pixels = _rng_pixels((10, 11), np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 65535
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert read_raw_image(tmp_path / "deep.png").dtype == np.uint16
    image = read_image(tmp_path / "deep.png")
    assert image.shape == (10, 11, 1)
    np.testing.assert_allclose(image[..., 0], pixels / 65535.0, atol=1e-7)
    assert image[0, 0, 0] == 0.0 and image[0, 1, 0] == 1.0


def test_16bit_tif_is_scaled_by_65535(tmp_path):
    pixels = _rng_pixels((8, 13), np.uint16)
    tifffile.imwrite(tmp_path / "deep.tif", pixels)
    image = read_image(tmp_path / "deep.tif")
    assert image.shape == (8, 13, 1)
    np.testing.assert_allclose(image[..., 0], pixels / 65535.0, atol=1e-7)
    assert image_size(tmp_path / "deep.tif") == (8, 13)


def test_channels_first_tif_becomes_channels_last(tmp_path):
    planar = _rng_pixels((3, 7, 10))  # tifffile writes this as planar RGB, axes "SYX"
    tifffile.imwrite(tmp_path / "planar.tif", planar)
    pages = _rng_pixels((2, 7, 10), seed=1)  # one gray page per channel, axes "QYX"
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="minisblack")
    np.testing.assert_allclose(read_image(tmp_path / "planar.tif"), np.moveaxis(planar, 0, -1) / 255.0, atol=1e-7)
    assert image_size(tmp_path / "planar.tif") == (7, 10)
    # Two channels are read as gray + alpha: the alpha page is dropped.
    np.testing.assert_allclose(read_image(tmp_path / "pages.tif")[..., 0], pages[0] / 255.0, atol=1e-7)


def test_tif_stack_is_refused_naming_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((9, 8, 8), np.uint8))
    with pytest.raises(MedsegError, match=r"stack\.tif.*multi-page stack"):
        read_image(tmp_path / "stack.tif")


def test_rgba_png_and_tif_drop_alpha(tmp_path):
    rgba = _rng_pixels((6, 9, 4))
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    for name in ("rgba.png", "rgba.tif"):
        image = read_image(tmp_path / name)
        assert image.shape == (6, 9, 3), name
        np.testing.assert_allclose(image, rgba[..., :3] / 255.0, atol=1e-7)


def test_bmp_and_palette_png_read_as_rgb(tmp_path):
    pixels = _rng_pixels((5, 8, 3))
    Image.fromarray(pixels).save(tmp_path / "plain.bmp")
    np.testing.assert_allclose(read_image(tmp_path / "plain.bmp"), pixels / 255.0, atol=1e-7)

    palette_image = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    palette_image.putpalette([10, 20, 30, 200, 100, 0] + [0] * (256 * 3 - 6))
    palette_image.save(tmp_path / "palette.png")
    image = read_image(tmp_path / "palette.png")
    np.testing.assert_allclose(image[0, 1] * 255, [200, 100, 0], atol=1e-4)
    np.testing.assert_allclose(image[0, 0] * 255, [10, 20, 30], atol=1e-4)


def test_jpeg_reduce_to_decodes_smaller_but_never_below_request(kvasir):
    path = kvasir / "images" / f"{LARGE_KVASIR}.jpg"
    full = read_image(path)
    assert full.shape == (1072, 1920, 3)
    for request in [(96, 96), (300, 200), (536, 960), (600, 1000)]:
        reduced = read_image(path, reduce_to=request)
        assert reduced.shape[0] >= request[0] and reduced.shape[1] >= request[1], request
        # Never more than twice the request on the tighter side: the largest allowed reduction was used.
        assert min(reduced.shape[0] / request[0], reduced.shape[1] / request[1]) < 2, (request, reduced.shape)
    reduced = read_image(path, reduce_to=(96, 96))
    assert reduced.shape == (134, 240, 3)  # 1/8 scale: ceil(1072 / 8), ceil(1920 / 8)
    shrunk = Image.fromarray(np.round(full * 255).astype(np.uint8)).resize((240, 134), Image.BOX)
    assert np.abs(np.asarray(shrunk) / 255.0 - reduced).mean() < 0.02
    # A request larger than the image leaves it at full size.
    assert read_image(path, reduce_to=(2000, 3000)).shape == full.shape


def test_reduce_to_is_ignored_for_png(tmp_path):
    Image.fromarray(_rng_pixels((64, 64, 3))).save(tmp_path / "big.png")
    assert read_image(tmp_path / "big.png", reduce_to=(8, 8)).shape == (64, 64, 3)


def test_image_size_reads_header_only(kvasir):
    path = kvasir / "images" / f"{SMALL_KVASIR}.jpg"
    assert image_size(path) == read_image(path).shape[:2] == (352, 568)


def test_corrupt_and_truncated_files_raise_medseg_error(tmp_path, kvasir):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    jpeg_bytes = (kvasir / "images" / f"{SMALL_KVASIR}.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    png_buffer = tmp_path / "whole.png"
    Image.fromarray(_rng_pixels((64, 64, 3))).save(png_buffer)
    (tmp_path / "truncated.png").write_bytes(png_buffer.read_bytes()[:-2000])
    (tmp_path / "empty.tif").write_bytes(b"")
    for name in ("garbage.png", "truncated.jpg", "truncated.png", "empty.tif"):
        with pytest.raises(MedsegError, match=rf"^cannot read image .*{name}: .+; "):
            read_image(tmp_path / name)
    with pytest.raises(MedsegError, match=r"cannot read mask .*truncated\.png"):
        read_mask(tmp_path / "truncated.png")
    with pytest.raises(MedsegError, match="cannot read image"):
        read_image(tmp_path / "missing.png")


def test_file_errors_name_the_file_and_can_be_said_without_it(tmp_path):
    """The message names the file; `without_path` (what check-data shows beside the file) does not."""
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(FileError, match=r"^cannot read image .*empty\.png: the file is empty \(0 bytes\)") as caught:
        read_image(tmp_path / "empty.png")
    assert caught.value.without_path.startswith("cannot read image: the file is empty")
    (tmp_path / "junk.png").write_text("not a picture")
    with pytest.raises(FileError) as caught:
        read_image(tmp_path / "junk.png")
    assert str(tmp_path) not in caught.value.without_path and "cannot identify image file" in caught.value.without_path


def test_a_file_without_read_permission_says_so(tmp_path, monkeypatch):
    """Simulated: tests may run as root, who reads files whatever their mode."""
    _write_gray(tmp_path / "locked.png", 10)

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("medseg.data.io.Image.open", refuse)
    with pytest.raises(FileError, match=r"locked\.png: permission denied; make it readable \(chmod a\+r\)"):
        read_mask(tmp_path / "locked.png")


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha", "slice.dcm", "array.npy"])
def test_volumes_and_other_non_2d_files_say_what_to_do(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x1f\x8b whatever")
    hint = "export the image as PNG" if name.endswith(".dcm") else "save it as TIFF" if name.endswith(".npy") \
        else "medseg slices"
    for read in (read_image, read_mask, image_size):
        with pytest.raises(FileError, match=rf"^cannot read (image|mask) .*{name}: it is a .*{hint}"):
            read(tmp_path / name)


def test_nan_and_inf_pixels_are_refused_when_loading(tmp_path):
    pixels = np.full((6, 7), 0.5, np.float32)
    pixels[0, :3] = [np.nan, np.inf, -np.inf]
    tifffile.imwrite(tmp_path / "bad.tif", pixels)
    assert np.isnan(read_raw_image(tmp_path / "bad.tif")).any()  # the checker sees the raw pixels
    with pytest.raises(FileError, match=r"bad\.tif has 3 NaN or Inf pixel\(s\) of 42; .*numpy\.nan_to_num"):
        read_image(tmp_path / "bad.tif")


def test_a_worker_wrapped_file_error_prints_as_its_own_line():
    wrapped = RuntimeError("Caught FileError in DataLoader worker process 0.\nTraceback (most recent call last):\n"
                           "  File \"x.py\", line 1\nmedseg.data.io.FileError: image a.tif has 3 NaN or Inf pixel(s)")
    assert user_message(wrapped) == "image a.tif has 3 NaN or Inf pixel(s)"
    assert str(FileError("one argument, as a worker re-raises it")) == "one argument, as a worker re-raises it"


def test_to_channels_converts_gray_and_rgb_only():
    gray = np.random.default_rng(0).random((4, 5, 1), dtype=np.float32)
    rgb = to_channels(gray, 3)
    assert rgb.shape == (4, 5, 3) and np.array_equal(rgb[..., 2], gray[..., 0])
    colour = np.random.default_rng(1).random((4, 5, 3), dtype=np.float32)
    luma = to_channels(colour, 1)
    assert luma.shape == (4, 5, 1) and luma.dtype == np.float32
    expected = 0.299 * colour[..., 0] + 0.587 * colour[..., 1] + 0.114 * colour[..., 2]
    np.testing.assert_allclose(luma[..., 0], expected, rtol=1e-5)
    assert float(BT601_LUMA.sum()) == pytest.approx(1.0)
    assert to_channels(colour, 3) is colour
    with pytest.raises(MedsegError, match="2 channels"):
        to_channels(np.zeros((2, 2, 2), np.float32), 3)


def test_write_image_atomic_round_trips_and_leaves_no_temporary(tmp_path):
    gray = _rng_pixels((7, 6))
    deep = _rng_pixels((7, 6), np.uint16)
    colour = _rng_pixels((7, 6, 3))
    write_image_atomic(tmp_path / "new" / "folder" / "gray.png", gray)
    write_image_atomic(tmp_path / "deep.png", deep)
    write_image_atomic(tmp_path / "colour.png", colour)
    write_image_atomic(tmp_path / "colour.png", colour[::-1].copy())  # overwriting an existing file
    assert np.array_equal(read_mask(tmp_path / "new" / "folder" / "gray.png"), gray)
    assert np.array_equal(read_mask(tmp_path / "deep.png"), deep)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "colour.png")), colour[::-1])
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []
    with pytest.raises(ValueError, match="8-bit RGB"):
        write_image_atomic(tmp_path / "deep_rgb.png", np.zeros((2, 2, 3), np.uint16))
    assert not (tmp_path / "deep_rgb.png").exists()


def test_write_image_atomic_failing_mid_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    write_image_atomic(tmp_path / "mask.png", np.zeros((4, 4), np.uint8))

    def half_then_fail(self, stream, *args, **kwargs):
        stream.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_image_atomic(tmp_path / "mask.png", np.ones((4, 4), np.uint8))
    with pytest.raises(OSError, match="disk full"):
        write_image_atomic(tmp_path / "new.png", np.ones((4, 4), np.uint8))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]  # no new.png, no temporary
    assert np.array_equal(read_mask(tmp_path / "mask.png"), np.zeros((4, 4), np.uint8))


# ----------------------------------------------------------------------------- masks


def test_binary_masks_0_255_and_0_1_become_0_1(tmp_path):
    pattern = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    for name, stored in (("m255.png", pattern * 255), ("m01.png", pattern)):
        Image.fromarray(stored).save(tmp_path / name)
        raw = read_mask(tmp_path / name)
        assert raw.ndim == 2 and raw.dtype == np.uint8
        labels = mask_to_labels(raw, num_classes=1, mask_threshold=None, path=tmp_path / name)
        assert labels.dtype == np.uint8 and np.array_equal(labels, pattern)
    # All-background and all-foreground masks are valid binary masks too.
    assert unexpected_mask_values(np.zeros((3, 3), np.uint8), 1, None) == []
    assert mask_to_labels(np.full((3, 3), 255, np.uint8), 1, None).min() == 1


def test_three_valued_mask_in_binary_mode_lists_values_and_file(tmp_path):
    raw = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    assert unexpected_mask_values(raw, 1, None) == [0, 1, 2]
    with pytest.raises(MaskValueError) as caught:
        mask_to_labels(raw, 1, None, path=tmp_path / "labels.png")
    message = str(caught.value)
    assert "labels.png" in message and "{0, 1, 2}" in message
    assert "data.mask_threshold" in message and "model.num_classes" in message
    assert "\n" not in message
    assert isinstance(caught.value, MedsegError)


def test_many_bad_values_are_listed_at_most_eight():
    raw = np.arange(40, dtype=np.uint8).reshape(5, 8)
    with pytest.raises(MaskValueError, match=r"\{0, 1, 2, 3, 4, 5, 6, 7, \.\.\.\} \(40 distinct values\)"):
        mask_to_labels(raw, 1, None)


def test_threshold_mode_reads_noisy_masks():
    noisy = np.array([[0, 3, 126], [127, 128, 250]], np.uint8)
    assert unexpected_mask_values(noisy, 1, 127) == []
    assert np.array_equal(mask_to_labels(noisy, 1, 127), [[0, 0, 0], [0, 1, 1]])


def test_multiclass_labels_pass_through_and_out_of_range_is_refused(tmp_path):
    raw = np.array([[0, 1], [2, 2]], np.uint16)
    labels = mask_to_labels(raw, num_classes=3, mask_threshold=None)
    assert labels.dtype == np.uint8 and np.array_equal(labels, raw)
    raw[0, 0] = 3
    assert unexpected_mask_values(raw, 3, None) == [3]
    with pytest.raises(MaskValueError, match=r"organs\.png has values \{3\} outside the labels 0\.\.2"):
        mask_to_labels(raw, 3, None, path=tmp_path / "organs.png")


def test_two_class_heads_read_binary_masks_as_background_and_foreground():
    raw = np.array([[0, 255], [255, 0]], np.uint8)
    assert np.array_equal(mask_to_labels(raw, num_classes=2, mask_threshold=None), [[0, 1], [1, 0]])
    assert unexpected_mask_values(np.array([[0, 1, 2]], np.uint8), 2, None) == [0, 1, 2]


def test_mask_reading_keeps_raw_values(tmp_path):
    deep = np.array([[0, 1000], [65535, 7]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert read_mask(tmp_path / "deep.png").dtype == np.uint16
    assert np.array_equal(read_mask(tmp_path / "deep.png"), deep)
    tifffile.imwrite(tmp_path / "labels.tif", np.array([[0, 3], [2, 1]], np.uint8))
    assert np.array_equal(read_mask(tmp_path / "labels.tif"), [[0, 3], [2, 1]])
    indices = np.array([[0, 2], [1, 0]], np.uint8)
    palette_mask = Image.fromarray(indices, mode="P")
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette_mask.save(tmp_path / "voc.png")
    assert np.array_equal(read_mask(tmp_path / "voc.png"), indices)  # palette index = label


def test_gray_stored_as_rgb_mask_is_accepted_but_colour_is_refused(tmp_path):
    plane = np.array([[0, 255], [255, 0]], np.uint8)
    Image.fromarray(np.stack([plane] * 3, axis=-1)).save(tmp_path / "grey_rgb.png")
    Image.fromarray(np.stack([plane] * 3 + [np.full_like(plane, 255)], axis=-1), mode="RGBA").save(
        tmp_path / "grey_rgba.png"
    )
    for name in ("grey_rgb.png", "grey_rgba.png"):
        assert np.array_equal(read_mask(tmp_path / name), plane), name
    colour = np.stack([plane, plane[::-1], plane], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(MedsegError, match=r"colour\.png is a colour image; save masks as single-channel"):
        read_mask(tmp_path / "colour.png")


# ----------------------------------------------------------------------------- layouts


def _write_gray(path: Path, value: int, shape=(6, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def test_folder_layout_pairs_by_stem(tmp_path):
    for name in ("a.png", "b.jpg", "c.PNG", "lonely.png", "twin.png", "twin.jpg", ".hidden.png"):
        _write_gray(tmp_path / "images" / name, 100)
    for name in ("a.png", "b.png", "c.png", "orphan.png", "twin.png"):
        _write_gray(tmp_path / "masks" / name, 255)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "sub").mkdir()

    layout = discover(tmp_path)
    assert layout.kind == "folder" and layout.root == tmp_path and layout.labels is None
    assert [c.stem for c in layout.cases] == ["a", "b", "c"]
    assert layout.cases[1] == Case("b", (tmp_path / "images" / "b.jpg",), tmp_path / "masks" / "b.png")
    assert layout.unpaired_images == [tmp_path / "images" / "lonely.png"]
    assert layout.unpaired_masks == [tmp_path / "masks" / "orphan.png"]
    assert layout.duplicate_stems == {"twin": [tmp_path / "images" / "twin.jpg", tmp_path / "images" / "twin.png"]}
    assert layout.test_cases == []
    assert load_case(layout.cases[0]).shape == (6, 8, 1)


def _nnunet(root: Path) -> None:
    meta = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "lesion": 1},
            "numTraining": 3, "file_ending": ".png"}
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    for case in ("case_a", "case_b"):
        _write_gray(root / "imagesTr" / f"{case}_0000.png", 10)
        _write_gray(root / "imagesTr" / f"{case}_0001.png", 20)
        _write_gray(root / "labelsTr" / f"{case}.png", 1)
    _write_gray(root / "imagesTr" / "case_c_0000.png", 10)  # its _0001 channel file is missing
    _write_gray(root / "labelsTr" / "case_c.png", 1)
    _write_gray(root / "imagesTs" / "held_0000.png", 30)
    _write_gray(root / "imagesTs" / "held_0001.png", 40)
    _write_gray(root / "labelsTs" / "held.png", 0)
    _write_gray(root / "imagesTs" / "unlabelled_0000.png", 30)  # inference input: not a problem
    _write_gray(root / "imagesTs" / "unlabelled_0001.png", 40)


def test_nnunet_layout_stacks_channel_files(tmp_path):
    root = tmp_path / "Dataset001_Toy"
    _nnunet(root)
    layout = discover(root)
    assert layout.kind == "nnunet"
    assert layout.labels == {"background": 0, "lesion": 1}
    assert [c.stem for c in layout.cases] == ["case_a", "case_b"]
    assert layout.cases[0].images == (root / "imagesTr" / "case_a_0000.png", root / "imagesTr" / "case_a_0001.png")
    assert layout.cases[0].mask == root / "labelsTr" / "case_a.png"
    assert [c.stem for c in layout.test_cases] == ["held"]
    assert layout.unpaired_images == [root / "imagesTr" / "case_c_0000.png"]
    assert "case_c_0001.png" in layout.details[root / "imagesTr" / "case_c_0000.png"]
    assert layout.unpaired_masks == [root / "labelsTr" / "case_c.png"]
    assert layout.stem_of(root / "imagesTr" / "case_c_0000.png") == "case_c"
    stacked = load_case(layout.cases[0])
    assert stacked.shape == (6, 8, 2)
    np.testing.assert_allclose(stacked[0, 0], [10 / 255, 20 / 255], atol=1e-7)


def test_discover_refuses_what_is_not_a_dataset(tmp_path):
    with pytest.raises(MedsegError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(MedsegError, match=r"expected DATA/images \+ DATA/masks, or nnU-Net's dataset\.json"):
        discover(tmp_path)
    (tmp_path / "dataset.json").write_text('{"labels": {"background": 0}}')
    with pytest.raises(MedsegError, match="lacks channel_names, file_ending"):
        discover(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(MedsegError, match=r"cannot read .*dataset\.json"):
        discover(tmp_path)
