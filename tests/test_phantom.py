"""The synthetic demo dataset (medseg.data.phantom): deterministic, self-describing, lesions of many sizes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from medseg.data.check import check_data
from medseg.data.phantom import make_phantom
from medseg.errors import MedsegError


@pytest.fixture(scope="module")
def default_phantom(tmp_path_factory) -> Path:
    """The phantom exactly as `medseg demo` makes it (default n, size and seed)."""
    return make_phantom(tmp_path_factory.mktemp("default_phantom") / "demo")


def _masks(root: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted((root / "masks").glob("*.png"))]


def test_reruns_are_byte_identical(default_phantom, tmp_path):
    # Image i depends only on (seed, i), so a shorter rerun must reproduce the first files exactly.
    again = make_phantom(tmp_path / "again", n=20)
    files = [Path(folder) / f"phantom_{i:04d}.png" for folder in ("images", "masks") for i in range(20)]
    assert all((default_phantom / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert len(list((again / "images").iterdir())) == 20
    other_seed = make_phantom(tmp_path / "other", n=4, seed=1)
    first = Path("images") / "phantom_0000.png"
    assert (other_seed / first).read_bytes() != (default_phantom / first).read_bytes()


def test_layout_sizes_and_value_ranges(default_phantom):
    images = sorted((default_phantom / "images").glob("*.png"))
    assert [p.name for p in images[:2]] == ["phantom_0000.png", "phantom_0001.png"] and len(images) == 160
    first = Image.open(images[0])
    assert first.mode == "RGB" and first.size == (96, 96)
    masks = _masks(default_phantom)
    assert len(masks) == 160 and all(m.shape == (96, 96) and m.dtype == np.uint8 for m in masks)
    assert set(np.unique(np.stack(masks))) == {0, 255}
    report = check_data(default_phantom)
    assert report.ok and {p.kind for p in report.problems} <= {"empty-mask"}


def test_readme_says_synthetic_with_its_parameters(default_phantom):
    readme = (default_phantom / "README.md").read_text()
    assert "SYNTHETIC" in readme and "seed 0" in readme and "n 160" in readme and "96 x 96" in readme
    assert "lesion" in readme.lower()


def test_lesions_range_from_a_few_pixels_to_large_and_some_images_are_empty(default_phantom):
    masks = _masks(default_phantom)
    areas = []
    for mask in masks:
        labelled, count = ndimage.label(mask > 0)
        areas += list(np.bincount(labelled.ravel())[1:])
    assert min(areas) <= 20, "no lesion of a few pixels"
    assert max(areas) >= 900, "no large lesion (radius about size / 4)"
    empty = sum(1 for mask in masks if not mask.any())
    assert 1 <= empty <= 24  # about 5 % of 160


def test_lesions_differ_from_tissue_but_not_by_one_threshold(default_phantom):
    images = np.stack([np.asarray(Image.open(p)) for p in sorted((default_phantom / "images").glob("*.png"))[:60]])
    lesion = np.stack(_masks(default_phantom)[:60]) > 0
    redness = images[..., 0].astype(float) - images[..., 2]
    assert redness[lesion].mean() > redness[~lesion].mean() + 30
    # Overlapping intensity ranges: some tissue is brighter than some lesion.
    brightness = images.mean(axis=-1)
    assert np.percentile(brightness[~lesion], 99) > np.percentile(brightness[lesion], 5)


def test_existing_folders_are_protected_and_old_phantoms_replaced(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(MedsegError, match="not a medseg phantom"):
        make_phantom(precious, n=2)
    assert (precious / "notes.txt").read_text() == "keep me"

    target = make_phantom(tmp_path / "demo", n=5)
    make_phantom(target, n=3, size=32)
    assert len(list((target / "images").iterdir())) == 3
    assert Image.open(target / "images" / "phantom_0000.png").size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "precious"]  # no staging leftovers
