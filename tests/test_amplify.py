"""STS-Net amplification blocks: thresholds, alignment of every view, untouched non-qualifying images."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from medseg.data.amplify import amplify_folder, compute_thresholds
from medseg.errors import MedsegError


def test_thresholds_reproduce_the_papers_sccm_values():
    t = compute_thresholds([2025, 0, 0])  # A = 1 image with a lesion, S = 2025 pixels
    assert (t.n1, t.n2, t.lesion_images, t.lesion_pixels) == (2025, 1024, 1, 2025)  # Table 7: 45^2 and 32^2
    t = compute_thresholds([100, 300])  # sqrt(200) -> 15 -> 225; sqrt(112.5) -> 11 -> 121
    assert (t.n1, t.n2) == (225, 121)
    with pytest.raises(MedsegError, match="no training mask has a lesion"):
        compute_thresholds([0, 0])


@pytest.fixture()
def coded(tmp_path):
    """Four 320x320 images whose red channel IS the mask (so misalignment is visible); lesions of
    40, 400, 6000 pixels and none."""
    root = tmp_path / "coded"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for stem, (top, left, h, w) in {"tiny": (100, 200, 5, 8), "small": (150, 60, 20, 20), "big": (100, 100, 60, 100),
                                    "empty": (0, 0, 0, 0)}.items():
        mask = np.zeros((320, 320), np.uint8)
        mask[top:top + h, left:left + w] = 255
        image = np.stack([mask, rng.integers(0, 255, (320, 320), dtype=np.uint8),
                          np.full((320, 320), 90, np.uint8)], -1)
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


def test_amplified_views_keep_masks_aligned_and_leave_the_rest_untouched(coded, tmp_path):
    out = tmp_path / "amplified"
    record = amplify_folder(coded, out, n2=1000)
    assert record["thresholds"]["n2"] == 1000 and record["qualifying_images"] == 2  # tiny (40 px) and small (400 px)
    views = {v["stem"]: v for v in record["views"]}
    assert len(views) == 10 and {v["op"] for v in views.values()} == {"vflip", "hflip", "crop", "hflip_crop", "centre"}
    assert len(list((out / "images").iterdir())) == 4 + 10
    for stem in ("big", "empty", "tiny", "small"):  # originals are byte-identical copies
        assert (out / "images" / f"{stem}.png").read_bytes() == (coded / "images" / f"{stem}.png").read_bytes()
    for stem, view in views.items():
        image = np.array(Image.open(out / "images" / f"{stem}.png"))
        mask = np.array(Image.open(out / "masks" / f"{stem}.png"))
        assert image.shape[:2] == mask.shape == (320, 320) and set(np.unique(mask)) <= {0, 255}
        if view["op"] in ("vflip", "hflip"):
            assert np.array_equal(image[..., 0], mask), stem
        else:  # bilinear image vs nearest mask: they may differ only along the lesion's edge
            assert ((image[..., 0] > 127) == (mask > 127)).mean() > 0.995, stem
            assert mask.any(), stem
    centre = views["tiny_amp_centre"]["params"]
    assert 100 <= centre["centre"][0] <= 105 and 200 <= centre["centre"][1] <= 208  # the lesion's centre
    assert centre["top"] == 0 and centre["bottom"] == 2 * centre["centre"][0]  # half-extent clamped by the top border
    assert (out / "amplify.json").is_file()


def test_with_splits_only_train_images_are_amplified(coded, tmp_path):
    (coded / "splits.json").write_text(json.dumps({"train": ["tiny", "big", "empty"], "val": ["small"], "test": []}))
    record = amplify_folder(coded, tmp_path / "out", n2=1000)
    assert {v["source"] for v in record["views"]} == {"tiny"}
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert len(splits["train"]) == 3 + 5 and splits["val"] == ["small"]
    with pytest.raises(MedsegError, match="exists"):
        amplify_folder(coded, tmp_path / "out", n2=1000)


def test_amplify_command_on_real_nuclei(shared_data, tmp_path):
    source = shared_data / "dsb2018_nuclei"
    data = tmp_path / "nuclei"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for path in sorted((source / "images").iterdir())[:12]:
        shutil.copy(path, data / "images")
        shutil.copy(source / "masks" / f"{path.stem}.png", data / "masks")
    result = run_cli("amplify", str(data), "--out", str(tmp_path / "amp"))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "amp" / "amplify.json").read_text())
    t = record["thresholds"]
    assert f"N1 {t['n1']}, N2 {t['n2']}" in result.stdout and t["lesion_images"] == 12
    assert len(list((tmp_path / "amp" / "images").iterdir())) == 12 + 5 * record["qualifying_images"]
