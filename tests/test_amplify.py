"""STS-Net amplification blocks (paper Table 7, methods 1-4): thresholds, which images qualify at the
training size, the views each method writes (count, size, where the lesion lands), untouched originals."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from medseg.config import load_recipe
from medseg.data.amplify import STANDARD, Thresholds, amplify_folder, compute_thresholds, plan
from medseg.data.dataset import SegmentationDataset
from medseg.data.formats import discover
from medseg.engine.data import amplified_views, preprocessing_of
from medseg.errors import MedsegError

SIDE = 256
ZOOM = SIDE / (SIDE - 2 * 50)  # a 50-px border crop resized back
# (top, left, height, width) of each synthetic lesion; Table 7's thresholds N1 = 2025, N2 = 1024 at 256 px:
# tiny (36 px) and medium (576 px) are under N2, mid (1600 px) only under N1, big (3600 px) under neither.
LESIONS = {"tiny": (100, 140, 6, 6), "medium": (110, 70, 24, 24), "mid": (120, 120, 40, 40),
           "big": (90, 90, 60, 60), "empty": (0, 0, 0, 0)}
TABLE7 = {"n1": 2025, "n2": 1024}


def write_pair(root, stem, side, box, seed=0):
    """An RGB image whose red channel IS the mask (so a misaligned view shows) and its 0/255 mask."""
    top, left, h, w = box
    mask = np.zeros((side, side), np.uint8)
    mask[top:top + h, left:left + w] = 255
    noise = np.random.default_rng(seed).integers(0, 255, (side, side), dtype=np.uint8)
    image = np.stack([mask, noise, np.full((side, side), 90, np.uint8)], -1)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


@pytest.fixture()
def coded(tmp_path):
    root = tmp_path / "coded"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for seed, (stem, box) in enumerate(LESIONS.items()):
        write_pair(root, stem, SIDE, box, seed)
    return root


def bbox(mask):
    """[row0, row1, col0, col1) of the foreground."""
    rows, cols = np.nonzero(mask)
    return np.array([rows.min(), rows.max() + 1, cols.min(), cols.max() + 1], float)


def expected_bbox(op, box):
    """Where the lesion's box lands after the view's steps (continuous coordinates)."""
    top, left, h, w = box
    r0, r1, c0, c1 = top, top + h, left, left + w
    for step in op.split("_"):
        if step == "vflip":
            r0, r1 = SIDE - r1, SIDE - r0
        elif step == "hflip":
            c0, c1 = SIDE - c1, SIDE - c0
        else:  # crop: the 50-px border goes, the rest is stretched back to SIDE
            r0, r1, c0, c1 = ((v - 50) * ZOOM for v in (r0, r1, c0, c1))
    return np.array([r0, r1, c0, c1])


def test_thresholds_reproduce_the_papers_sccm_values():
    t = compute_thresholds([2025, 0, 0])  # A = 1 image with a lesion, S = 2025 pixels
    assert (t.n1, t.n2, t.lesion_images, t.lesion_pixels) == (2025, 1024, 1, 2025)  # Table 7: 45^2 and 32^2
    t = compute_thresholds([100, 300])  # sqrt(200) -> 15 -> 225; sqrt(112.5) -> 11 -> 121
    assert (t.n1, t.n2) == (225, 121)
    with pytest.raises(MedsegError, match="no training mask has a lesion"):
        compute_thresholds([0, 0])


@pytest.mark.parametrize("method, expected", [
    (1, {"tiny": set(STANDARD), "medium": set(STANDARD), "mid": set(STANDARD)}),  # under N1 = 2025
    (2, {"tiny": set(STANDARD), "medium": set(STANDARD)}),  # under N2 = 1024
    # the views still under N2 are cropped again; medium's crop views (576 px x 2.7) are not
    (3, {"tiny": {*STANDARD, "vflip_crop", "crop_crop", "hflip_crop_crop"}, "medium": {*STANDARD, "vflip_crop"}}),
    (4, {"tiny": {*STANDARD, "centre"}, "medium": {*STANDARD, "centre"}}),  # method 2 + the centre crop
])
def test_each_method_writes_the_papers_views(coded, tmp_path, method, expected):
    out = tmp_path / "amplified"
    record = amplify_folder(coded, out, **TABLE7, method=method, size=SIDE)
    assert record["method"] == method and record["size"] == [SIDE, SIDE]
    written = {}
    for view in record["views"]:
        written.setdefault(view["source"], set()).add(view["op"])
    assert written == expected
    assert record["new_images"] == sum(map(len, expected.values())) == len(record["views"])
    assert len(list((out / "images").iterdir())) == len(LESIONS) + record["new_images"]
    for stem in LESIONS:  # originals are byte-identical copies
        assert (out / "images" / f"{stem}.png").read_bytes() == (coded / "images" / f"{stem}.png").read_bytes()
    for view in record["views"]:
        image = np.array(Image.open(out / "images" / f"{view['stem']}.png"))
        mask = np.array(Image.open(out / "masks" / f"{view['stem']}.png"))
        assert image.shape[:2] == mask.shape == (SIDE, SIDE) and set(np.unique(mask)) <= {0, 255}
        # bilinear image vs nearest mask: they may differ only along the lesion's edge
        assert ((image[..., 0] > 127) == (mask > 127)).mean() > 0.995, view["stem"]
        box = LESIONS[view["source"]]
        if view["op"] == "centre":  # the crop box is centred on the lesion, so the lesion lands in the middle
            centre = bbox(mask).reshape(2, 2).mean(1)
            # (the 2x2 dilation that locates the lesion shifts its centre by up to a pixel, times the zoom)
            assert np.abs(centre - SIDE / 2).max() <= 2.5, view["stem"]
            assert np.count_nonzero(mask) > box[2] * box[3]  # and is enlarged
        else:
            assert np.abs(bbox(mask) - expected_bbox(view["op"], box)).max() <= 1.5, view["stem"]
    if method == 3:  # the rule of the second crop: the standard crop view's lesion, at the training size
        assert np.count_nonzero(np.array(Image.open(out / "masks" / "tiny_amp_crop.png"))) < 1024
        assert np.count_nonzero(np.array(Image.open(out / "masks" / "medium_amp_crop.png"))) >= 1024


def test_lesions_are_counted_at_the_training_size(tmp_path):
    """A 40x40 lesion of a 512-px image is a 10x10 lesion at 128 (the brief's 2048 -> 512 case, scaled)."""
    root = tmp_path / "large"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    write_pair(root, "spot", 512, (200, 236, 40, 40))
    write_pair(root, "blob", 512, (100, 100, 200, 200))
    layout = discover(root)
    given = Thresholds(2025, 1024, None, None, "test")
    _, views, lesions = plan(layout, ["blob", "spot"], given, method=2, size=(512, 512))
    assert lesions == {"spot": 1600, "blob": 40000} and views == []  # 1600 >= N2 at the native size
    _, views, lesions = plan(layout, ["blob", "spot"], given, method=2, size=(128, 128))
    assert lesions == {"spot": 100, "blob": 2500} and {v.stem for v in views} == {f"spot_amp_{o}" for o in STANDARD}
    thresholds, _, _ = plan(layout, ["blob", "spot"], None, method=2, size=(128, 128))
    assert (thresholds.lesion_images, thresholds.lesion_pixels) == (2, 2600)  # A and S at 128 px
    assert (thresholds.n1, thresholds.n2) == (37 ** 2, 27 ** 2)  # sqrt(1300) -> 37; sqrt(684.5) -> 27
    # lengths are training-size pixels: at 384 the 50-px border is 67 px of the 512-px image, and the centre
    # crop's half-extents of 150..160 are 200..213 px
    _, views, _ = plan(layout, ["spot"], given, method=4, size=(384, 384))
    crop = next(v for v in views if v.op == "crop").params
    assert (crop["top"], crop["bottom"], crop["left"], crop["right"]) == (67, 445, 67, 445)
    centre = next(v for v in views if v.op == "centre").params
    assert np.abs(np.subtract(centre["centre"], [220, 256])).max() <= 1  # the lesion's centre, not clamped
    assert 400 <= centre["bottom"] - centre["top"] <= 428 and 400 <= centre["right"] - centre["left"] <= 428


def test_method_1_needs_n1_and_the_recipe_selects_the_method(coded):
    layout = discover(coded)
    only_n2 = Thresholds(None, 1024, None, None, "test")
    with pytest.raises(MedsegError, match="method 1 amplifies images under N1"):
        plan(layout, sorted(LESIONS), only_n2, method=1, size=(SIDE, SIDE))
    with pytest.raises(MedsegError, match="method"):
        load_recipe("stsnet", ["data.amplify.method=5"])
    assert load_recipe("stsnet", []).data.amplify.method == 4  # the paper's STS-Net
    recipe = load_recipe("stsnet", [f"data.size={SIDE}", "data.amplify={method: 3, n1: 2025}"])  # N2 by Eq. 2
    views, record = amplified_views(layout, {"train": sorted(LESIONS), "val": [], "test": []}, recipe)
    assert record["method"] == 3 and record["size"] == [SIDE, SIDE] and record["thresholds"]["n2"] == 1024
    assert len(views) == record["new_images"] == 7 + 5
    # training derives a view of a view in-line, as `medseg amplify` writes it
    dataset = SegmentationDataset(views, preprocessing_of(recipe), num_classes=2)
    item = dataset[next(i for i, v in enumerate(views) if v.stem == "tiny_amp_crop_crop")]
    assert item["mask"].shape == (SIDE, SIDE)
    assert np.abs(bbox(item["mask"].numpy()) - expected_bbox("crop_crop", LESIONS["tiny"])).max() <= 1.5


def test_with_splits_only_train_images_are_amplified(coded, tmp_path):
    (coded / "splits.json").write_text(json.dumps({"train": ["tiny", "big", "empty"], "val": ["medium"], "test": []}))
    record = amplify_folder(coded, tmp_path / "out", n2=1000, size=SIDE)
    assert {v["source"] for v in record["views"]} == {"tiny"}
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    assert len(splits["train"]) == 3 + 5 and splits["val"] == ["medium"]
    with pytest.raises(MedsegError, match="exists"):
        amplify_folder(coded, tmp_path / "out", n2=1000)


def test_amplify_command_with_a_method_and_a_size(coded, tmp_path):
    result = run_cli("amplify", str(coded), "--out", str(tmp_path / "m3"), "--method", "3", "--size", str(SIDE),
                     "--n1", "2025", "--n2", "1024")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "m3" / "amplify.json").read_text())
    assert record["method"] == 3 and record["new_images"] == 7 + 5 and "method 3" in result.stdout
    assert len(list((tmp_path / "m3" / "images").iterdir())) == len(LESIONS) + 12


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
    assert record["method"] == 4 and record["size"] == [512, 512]
    assert len(list((tmp_path / "amp" / "images").iterdir())) == 12 + 5 * record["qualifying_images"]
