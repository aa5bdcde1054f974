"""2.5D slices from NIfTI volumes: slice count, channel order, edge handling, both modes."""

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


def test_stack_mode_orders_neighbours_and_repeats_edges(volumes, tmp_path):
    record = make_slices(volumes, tmp_path / "stack")
    assert record["slices"] == 4
    images = [np.array(Image.open(tmp_path / "stack" / "images" / f"case01_{k:04d}.png")) for k in range(4)]
    assert images[0].shape == (5, 6, 3)  # (rows, cols) = transposed (x, y)
    for k, expected in enumerate([(10, 10, 20), (10, 20, 30), (20, 30, 40), (30, 40, 40)]):
        assert tuple(images[k][2, 3]) == tuple(_value(v) for v in expected), k
    mask = np.array(Image.open(tmp_path / "stack" / "masks" / "case01_0001.png"))
    assert mask[3, 2] == 255 and mask.sum() == 255  # voxel (x=2, y=3) lands at row 3, column 2


def test_sum_mode_is_the_clipped_pixel_sum_with_the_slice_counted_twice_at_edges(volumes, tmp_path):
    make_slices(volumes, tmp_path / "sum", mode="sum", window=(0, 100))
    first = np.array(Image.open(tmp_path / "sum" / "images" / "case01_0000.png"))
    last = np.array(Image.open(tmp_path / "sum" / "images" / "case01_0003.png"))
    scaled = [round(10 * (k + 1) / 100 * 255) for k in range(4)]
    assert first.ndim == 2 and first[2, 3] == min(255, 2 * scaled[0] + scaled[1])
    assert last[2, 3] == min(255, scaled[2] + 2 * scaled[3])


def test_only_lesion_labels_and_cli(volumes, tmp_path):
    record = make_slices(volumes, tmp_path / "lesion", only_lesion=True, keep_labels=True)
    assert record["slices"] == 2 and record["skipped_without_lesion"] == 2
    assert np.array(Image.open(tmp_path / "lesion" / "masks" / "case01_0002.png")).max() == 2
    result = run_cli("slices", str(volumes), "--out", str(tmp_path / "cli"), "--window=-50,50", "--mode", "sum")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 slices from 1 volumes" in result.stdout
    with pytest.raises(MedsegError, match="exists"):
        make_slices(volumes, tmp_path / "cli")
    (volumes / "labels" / "case01.nii.gz").unlink()
    with pytest.raises(MedsegError, match="without a partner: case01"):
        make_slices(volumes, tmp_path / "none")
