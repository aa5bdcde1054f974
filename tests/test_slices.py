"""Slices from NIfTI volumes: slice count, channel order, both edge rules, the stack, sum and single modes."""

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from medseg.data.volumes import make_slices
from medseg.errors import MedsegError


@pytest.fixture()
def volumes(tmp_path):
    """One 6x5x4 volume whose slice k is filled with 10 (k + 1), a lesion voxel on slices 1 and 2."""
    root = tmp_path / "volumes"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    image = np.zeros((6, 5, 4), np.int16)
    for k in range(4):
        image[:, :, k] = 10 * (k + 1)
    image[0, 0, :] = 0  # keeps the min-max range fixed at 0..40
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2, 3, 1] = 1
    labels[4, 1, 2] = 2
    nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / "case01.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), root / "labels" / "case01.nii.gz")
    return root


def _value(level: int) -> int:
    return round(level / 40 * 255)


def _images(folder):
    return [np.array(Image.open(folder / "images" / f"case01_{k:04d}.png")) for k in range(4)]


def test_stack_mode_orders_neighbours_and_triples_edge_slices_by_default(volumes, tmp_path):
    record = make_slices(volumes, tmp_path / "stack")
    assert record["slices"] == 4 and record["edge"] == "triple"
    images = _images(tmp_path / "stack")
    assert images[0].shape == (5, 6, 3)  # (rows, cols) = transposed (x, y)
    # STS-Net Fig. 2: the first and last 2.5D images are their slice tripled
    for k, expected in enumerate([(10, 10, 10), (10, 20, 30), (20, 30, 40), (40, 40, 40)]):
        assert tuple(images[k][2, 3]) == tuple(_value(v) for v in expected), k
    mask = np.array(Image.open(tmp_path / "stack" / "masks" / "case01_0001.png"))
    assert mask[3, 2] == 255 and mask.sum() == 255  # voxel (x=2, y=3) lands at row 3, column 2


def test_repeat_edges_keep_the_one_neighbour(volumes, tmp_path):
    make_slices(volumes, tmp_path / "repeat", edge="repeat")
    images = _images(tmp_path / "repeat")
    for k, expected in enumerate([(10, 10, 20), (10, 20, 30), (20, 30, 40), (30, 40, 40)]):
        assert tuple(images[k][2, 3]) == tuple(_value(v) for v in expected), k
    with pytest.raises(MedsegError, match="--edge must be triple or repeat"):
        make_slices(volumes, tmp_path / "bad", edge="zero")


@pytest.mark.parametrize("edge, first", [("triple", 3 * 26), ("repeat", 2 * 26 + 51)])
def test_sum_mode_is_the_clipped_pixel_sum_of_the_edge_rule_slices(volumes, tmp_path, edge, first):
    make_slices(volumes, tmp_path / "sum", mode="sum", window=(0, 100), edge=edge)
    images = _images(tmp_path / "sum")
    assert [round(10 * (k + 1) / 100 * 255) for k in range(4)] == [26, 51, 76, 102]
    assert images[0].ndim == 2 and images[0][2, 3] == first
    assert images[1][2, 3] == 26 + 51 + 76
    assert images[3][2, 3] == 255  # 3 * 102 or 76 + 2 * 102, clipped


def test_single_mode_writes_the_windowed_slice_as_one_gray_channel(volumes, tmp_path):
    record = make_slices(volumes, tmp_path / "single", mode="single", window=(-20, 60))
    assert record["slices"] == 4 and record["mode"] == "single" and record["edge"] is None
    voxels = np.asarray(nib.load(volumes / "images" / "case01.nii.gz").dataobj).astype(np.float64)
    expected = np.round((np.clip(voxels, -20, 60) + 20) / 80 * 255).astype(np.uint8)
    for k in range(4):
        png = Image.open(tmp_path / "single" / "images" / f"case01_{k:04d}.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.array(png), expected[:, :, k].T)
    assert np.array(Image.open(tmp_path / "single" / "images" / "case01_0000.png"))[2, 3] == round(30 / 80 * 255)
    result = run_cli("slices", str(volumes), "--out", str(tmp_path / "cli"), "--single")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(mode single, window" in result.stdout
    assert Image.open(tmp_path / "cli" / "images" / "case01_0003.png").mode == "L"
    refused = run_cli("slices", str(volumes), "--out", str(tmp_path / "both"), "--single", "--mode", "sum")
    assert refused.returncode == 2 and "--single writes one-channel slices; it contradicts --mode sum" in refused.stderr
    assert not (tmp_path / "both").exists()


def test_only_lesion_labels_and_cli(volumes, tmp_path):
    record = make_slices(volumes, tmp_path / "lesion", only_lesion=True, keep_labels=True)
    assert record["slices"] == 2 and record["skipped_without_lesion"] == 2
    assert np.array(Image.open(tmp_path / "lesion" / "masks" / "case01_0002.png")).max() == 2
    result = run_cli("slices", str(volumes), "--out", str(tmp_path / "cli"), "--window=-50,50", "--mode", "sum")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 slices from 1 volumes" in result.stdout and "(mode sum, edges triple" in result.stdout
    with pytest.raises(MedsegError, match="exists"):
        make_slices(volumes, tmp_path / "cli")
    (volumes / "labels" / "case01.nii.gz").unlink()
    with pytest.raises(MedsegError, match="without a partner: case01"):
        make_slices(volumes, tmp_path / "none")
