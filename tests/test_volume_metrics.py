"""Per-volume metrics in mm (medseg.metrics.volume) against values computed by hand on cubes with anisotropic
spacing, an independent scipy computation (distance_transform_edt with sampling=), label merging, the empty rules
and the per-slice figures."""

import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.metrics.volume import (
    Foreground,
    diagonal_mm,
    foregrounds_for,
    label,
    merged,
    slice_metrics,
    surface_distances_mm,
    volume_metrics,
)

SPACING = (0.7, 0.7, 2.5)


def cube(offset=(0, 0, 0), side=4, start=2, shape=(10, 10, 10), value=1) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    x, y, z = (start + o for o in offset)
    volume[x:x + side, y:y + side, z:z + side] = value
    return volume


def scipy_surface_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[float, float]:
    """HD95 and ASSD computed without MONAI: boundary = mask minus its erosion (outside the volume is background),
    distances from each boundary voxel to the other boundary by an exact EDT with the voxel spacing."""
    def boundary(mask):
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    a, b = boundary(pred.astype(bool)), boundary(truth.astype(bool))
    a_to_b = ndimage.distance_transform_edt(~b, sampling=spacing)[a]
    b_to_a = ndimage.distance_transform_edt(~a, sampling=spacing)[b]
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return float(hd95), float(np.concatenate([a_to_b, b_to_a]).mean())


def test_cubes_shifted_one_slice_along_z():
    # 4x4x4 cubes, the prediction one slice higher (2.5 mm). Overlap 4x4x3 = 48 of 64 each: Dice 96/128 = 0.75,
    # IoU 48/80 = 0.6. Each surface has 56 voxels (64 minus the 2x2x2 inside). From the prediction's: its top face
    # (16) is 2.5 mm from the reference's top face; the 4 inner voxels of its bottom face lie inside the reference,
    # 0.7 mm (one column) from its side; the other 36 lie on the reference's surface. Both directions alike:
    # sorted 36 x 0, 4 x 0.7, 16 x 2.5, so the 95th percentile (index 52.25 of 55) is 2.5 and
    # ASSD = 2 (16 x 2.5 + 4 x 0.7) / 112 = 85.6 / 112.
    [row] = volume_metrics(cube((0, 0, 1)), cube(), SPACING, [1])
    assert row["dice"] == pytest.approx(0.75) and row["iou"] == pytest.approx(0.6)
    assert row["hd95_mm"] == pytest.approx(2.5, rel=1e-6)
    assert row["assd_mm"] == pytest.approx(85.6 / 112, rel=1e-6)
    assert (row["reference_voxels"], row["predicted_voxels"], row["labels"]) == (64, 64, "1")


def test_cubes_shifted_one_column_along_x_use_the_in_plane_spacing():
    # The same shift along x costs 0.7 mm: the 16 voxels of the leading face and the 4 inner voxels of the other
    # x face are 0.7 mm away (an in-plane step is cheaper than a 2.5 mm slice step), every other voxel 0.
    # HD95 0.7; ASSD = 2 x 20 x 0.7 / 112 = 0.25.
    [row] = volume_metrics(cube((1, 0, 0)), cube(), SPACING, [1])
    assert row["dice"] == pytest.approx(0.75)
    assert row["hd95_mm"] == pytest.approx(0.7, rel=1e-6)
    assert row["assd_mm"] == pytest.approx(0.25, rel=1e-6)


def test_oblique_shift_matches_an_independent_scipy_computation():
    rng = np.random.default_rng(0)
    truth = cube(side=6, start=3, shape=(16, 14, 12))
    truth[4:7, 9:12, 5:9] = 1  # a bump, so the surface is not a box
    pred = np.roll(truth, (2, -1, 1), axis=(0, 1, 2))
    pred[rng.random(pred.shape) > 0.97] = 1  # speckle far from the lesion lengthens the tail of the distances
    [row] = volume_metrics(pred, truth, SPACING, [1])
    hd95, assd = scipy_surface_distances(pred, truth, SPACING)
    assert row["hd95_mm"] == pytest.approx(hd95, rel=1e-5) and row["assd_mm"] == pytest.approx(assd, rel=1e-5)
    both = np.count_nonzero(pred & truth)
    assert row["dice"] == pytest.approx(2 * both / (pred.sum() + truth.sum()))
    assert row["iou"] == pytest.approx(both / np.count_nonzero(pred | truth))
    assert row["hd95_mm"] > 2.5  # the spacing matters: a slice step alone is 2.5 mm


def test_a_lesion_on_the_volume_border_keeps_its_border_face_as_surface():
    truth = cube(start=0)  # touches three faces of the volume
    pred = cube((0, 0, 1), start=0)
    [row] = volume_metrics(pred, truth, SPACING, [1])
    hd95, assd = scipy_surface_distances(pred, truth, SPACING)
    assert row["hd95_mm"] == pytest.approx(hd95, rel=1e-5) and row["assd_mm"] == pytest.approx(assd, rel=1e-5)


def test_empty_rules():
    empty, lesion = np.zeros((10, 12, 6), np.uint8), cube(shape=(10, 12, 6))
    diagonal = math.sqrt((10 * 0.7) ** 2 + (12 * 0.7) ** 2 + (6 * 2.5) ** 2)
    assert diagonal_mm(empty.shape, SPACING) == pytest.approx(diagonal)
    for pred, truth in ((empty, lesion), (lesion, empty)):  # one side empty: Dice 0, distances the diagonal
        [row] = volume_metrics(pred, truth, SPACING, [1])
        assert row["dice"] == 0 and row["iou"] == 0
        assert row["hd95_mm"] == pytest.approx(diagonal) and row["assd_mm"] == pytest.approx(diagonal)
    [row] = volume_metrics(empty, empty, SPACING, [1])  # both empty: nnU-Net's NaN by default
    assert all(math.isnan(row[m]) for m in ("dice", "iou", "hd95_mm", "assd_mm"))
    [row] = volume_metrics(empty, empty, SPACING, [1], empty="one")
    assert row["dice"] == 1.0 and row["iou"] == 1.0 and math.isnan(row["hd95_mm"])


def test_per_label_rows_and_merged_labels():
    # Reference: liver (1) a 6-cube, tumour (2) a 2-cube inside it. The prediction finds the liver but calls the
    # tumour liver: per label, liver Dice 2 x 208 / (216 + 208), tumour missed (0, the diagonal);
    # merged (1, 2) the whole organ is exact.
    truth = cube(side=6, start=2, shape=(12, 12, 12))
    truth[4:6, 4:6, 4:6] = 2
    pred = (truth > 0).astype(np.uint8)
    liver, tumour, organ = volume_metrics(pred, truth, SPACING, [1, 2, (1, 2)])
    assert liver["dice"] == pytest.approx(2 * 208 / (216 + 208)) and liver["reference_voxels"] == 208
    assert tumour["dice"] == 0 and tumour["hd95_mm"] == pytest.approx(diagonal_mm(truth.shape, SPACING))
    assert organ["labels"] == "1+2" and organ["dice"] == 1.0 and organ["hd95_mm"] == 0.0
    assert organ["reference_voxels"] == 216 == organ["predicted_voxels"]


def test_foregrounds_for_binary_and_multiclass_models():
    truth = cube(side=6, start=2, shape=(12, 12, 12))
    truth[4:6, 4:6, 4:6] = 2
    binary_pred = (truth > 0).astype(np.uint8)
    [everything] = foregrounds_for(1)  # default: every label > 0 against the model's class 1
    assert everything == Foreground((1,), None) and everything.name == ">0"
    assert volume_metrics(binary_pred, truth, SPACING, [everything])[0]["dice"] == 1.0
    [tumour_only] = foregrounds_for(1, labels=[2])  # --labels 2: the reference is the tumour alone
    row = volume_metrics(binary_pred, truth, SPACING, [tumour_only])[0]
    assert row["reference_voxels"] == 8 and row["predicted_voxels"] == 216
    assert row["dice"] == pytest.approx(2 * 8 / (8 + 216))
    assert foregrounds_for(3) == [label(1), label(2)]
    assert foregrounds_for(3, labels=[2, 1]) == [merged((1, 2))]
    with pytest.raises(ValueError):
        merged([0, 1])


def test_per_slice_figures_cover_slices_with_foreground_in_either():
    # The prediction is one slice higher: slice 2 has reference only (Dice 0), 3-5 match, 6 prediction only.
    rows = slice_metrics(cube((0, 0, 1)), cube(), [1])
    assert [r["slice"] for r in rows] == [2, 3, 4, 5, 6]
    assert [r["dice"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert rows[0]["reference_voxels"] == 16 and rows[0]["predicted_voxels"] == 0
    half = cube((2, 0, 0))  # shifted two columns: each slice overlaps by half
    assert [r["iou"] for r in slice_metrics(half, cube(), [1])] == pytest.approx([8 / 24] * 4)


def test_shape_and_spacing_mismatch_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        volume_metrics(cube(), cube(shape=(10, 10, 11)), SPACING, [1])
    with pytest.raises(ValueError, match="one value per axis"):
        volume_metrics(cube(), cube(), (1.0, 1.0), [1])


def test_one_distance_computation_equals_monais_two_metric_functions():
    """HD95 and ASSD from one `get_edge_surface_distance` equal MONAI's compute_hausdorff_distance(percentile=95)
    and compute_average_surface_distance(symmetric=True) exactly, which compute the distances once each."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(3)
    for spacing in ((1.0, 1.0, 1.0), (0.7, 0.9, 2.5)):
        for _ in range(4):
            pred = ndimage.binary_dilation(rng.random((14, 12, 9)) > 0.93, iterations=1)
            truth = ndimage.binary_dilation(rng.random((14, 12, 9)) > 0.93, iterations=1)
            pred_hot, truth_hot = torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None]
            hd95 = compute_hausdorff_distance(pred_hot, truth_hot, include_background=True, percentile=95,
                                              spacing=list(spacing))
            assd = compute_average_surface_distance(pred_hot, truth_hot, include_background=True, symmetric=True,
                                                    spacing=list(spacing))
            assert surface_distances_mm(pred, truth, spacing) == (float(hd95[0, 0]), float(assd[0, 0]))
