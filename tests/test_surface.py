"""Surface metrics (HD95, ASSD, NSD) against values computed by hand on small synthetic masks, every empty-mask
rule, the nnunet protocol that reports them, and decided labels replacing the threshold in every scorer."""

import math

import pytest
import torch

from medseg.metrics import get_protocol
from medseg.metrics.surface import SurfaceDistance, surface_scores


def square(top: int, left: int, side: int = 6, size: int = 16, label: int = 1) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.long)
    mask[top:top + side, left:left + side] = label
    return mask


def test_squares_shifted_by_two_columns():
    # Boundary pixels of a 6x6 square: 20. From the reference square (rows 4-9, cols 4-9) to the prediction's
    # boundary (cols 6-11): top and bottom rows 2,1,0,0,0,0 each, left column 2,2,2,2, right column 1,2,2,1
    # (sum 20, mean 1); symmetric, so ASSD 1. Sorted: eight 0, four 1, eight 2: the 95th percentile is 2.
    scores = surface_scores(square(4, 6), square(4, 4), 1, (1.0, 1.0), tolerance=2.0)
    assert scores["hd95"] == [2.0] and scores["assd"] == [1.0] and scores["nsd"] == [1.0]
    strict = surface_scores(square(4, 6), square(4, 4), 1, (1.0, 1.0), tolerance=1.0)
    assert strict["nsd"] == [pytest.approx(24 / 40)]  # twelve of twenty within 1, each way


def test_anisotropic_spacing_scales_rows_and_columns_apart():
    # Spacing (row 0.5, column 2): the two-column shift is 4 units. Per direction: top and bottom 4,2,0,0,0,0,
    # left 4,4,4,4, right 0.5,1,1,0.5 (rows now cost 0.5): sum 31 over 20 -> ASSD 1.55; 95th percentile 4;
    # within 2 units: 8 zeros, 2 x 0.5, 2 x 1, 2 x 2 = 14 of 20.
    scores = surface_scores(square(4, 6), square(4, 4), 1, (0.5, 2.0), tolerance=2.0)
    assert scores["hd95"] == [pytest.approx(4.0)]
    assert scores["assd"] == [pytest.approx(1.55)]
    assert scores["nsd"] == [pytest.approx(0.7)]


def test_single_pixels_three_apart():
    pred, truth = torch.zeros(16, 16, dtype=torch.long), torch.zeros(16, 16, dtype=torch.long)
    pred[3, 3], truth[3, 6] = 1, 1
    scores = surface_scores(pred, truth, 1, (1.0, 1.0), tolerance=2.0)
    assert scores == {"hd95": [3.0], "assd": [3.0], "nsd": [0.0]}
    assert surface_scores(truth, truth, 1, (1.0, 1.0), 2.0) == {"hd95": [0.0], "assd": [0.0], "nsd": [1.0]}


def test_empty_mask_rules():
    empty, lesion = torch.zeros(12, 20, dtype=torch.long), square(2, 2, size=12)[:, :12]
    lesion = torch.nn.functional.pad(lesion, (0, 8))  # 12 x 20
    diagonal = math.hypot(12 * 0.5, 20 * 1.0)
    for pred, truth in ((empty, lesion), (lesion, empty)):  # one side empty: the image diagonal, NSD 0
        scores = surface_scores(pred, truth, 1, (0.5, 1.0), 2.0)
        assert scores == {"hd95": [pytest.approx(diagonal)], "assd": [pytest.approx(diagonal)], "nsd": [0.0]}
    for rule, nsd in (("nan", math.nan), ("one", 1.0), ("zero", 0.0)):  # both empty: distances NaN, NSD by rule
        scores = surface_scores(empty, empty, 1, (1.0, 1.0), 2.0, empty=rule)
        assert math.isnan(scores["hd95"][0]) and math.isnan(scores["assd"][0])
        assert scores["nsd"][0] == nsd or (math.isnan(nsd) and math.isnan(scores["nsd"][0]))


def test_multiclass_per_class_and_mean():
    truth = square(2, 2, side=4, label=1) + square(9, 9, side=4, label=2)
    pred = square(2, 3, side=4, label=1)  # class 1 shifted by one column, class 2 missed
    scorer = SurfaceDistance(tolerance=1.0).scorer(3)
    probabilities = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).float()
    scorer.add(probabilities, truth)
    per_case = scorer.per_case()
    diagonal = math.hypot(16, 16)
    assert per_case["hd95_class1"] == [1.0] and per_case["hd95_class2"] == [pytest.approx(diagonal)]
    assert per_case["hd95"] == [pytest.approx((1.0 + diagonal) / 2)]
    assert per_case["nsd_class1"] == [1.0] and per_case["nsd_class2"] == [0.0] and per_case["nsd"] == [0.5]


def test_nnunet_protocol_reports_surface_metrics_with_its_empty_rule():
    protocol = get_protocol("nnunet")
    definition = protocol.definition()
    assert {"hd95", "assd", "nsd"} <= set(definition["metrics"])
    assert definition["surface"]["nsd_tolerance"] == 2.0 and "both_empty" in definition["surface"]["empty_rules"]
    scorer = protocol.scorer(1)
    empty = torch.zeros(16, 16, dtype=torch.long)
    scorer.add(torch.zeros(1, 16, 16), empty)  # both empty: every metric NaN, counted
    scorer.add(square(4, 6)[None].float(), square(4, 4))
    summary = scorer.summary()
    assert summary["hd95"] == {"value": 2.0, "std": 0.0, "median": 2.0, "n": 1, "n_nan": 1}
    assert summary["nsd"]["n_nan"] == 1 and summary["dice"]["n_nan"] == 1
    assert summary["dice"]["value"] == pytest.approx(2 * 24 / 72)
    paper = get_protocol("paper").definition()
    assert "surface" not in paper and "hd95" not in paper["metrics"]  # the other protocols are unchanged


def test_decided_labels_replace_the_threshold_for_label_metrics_only():
    truth = square(4, 4)
    probabilities = truth[None].float() * 0.4  # below 0.5 everywhere: thresholding finds nothing
    for name in ("nnunet", "goals", "infnet"):
        thresholded, decided = get_protocol(name).scorer(1), get_protocol(name).scorer(1)
        thresholded.add(probabilities, truth)
        decided.add(probabilities, truth, labels=truth)
        assert decided.per_case()["dice"] == [1.0] and thresholded.per_case()["dice"] == [0.0]
    maps_only, with_labels = get_protocol("pranet").scorer(1), get_protocol("pranet").scorer(1)
    maps_only.add(probabilities, truth)
    with_labels.add(probabilities, truth, labels=torch.zeros_like(truth))
    assert maps_only.per_case() == with_labels.per_case()  # map metrics read the probabilities


def test_spacing_reaches_the_surface_scorer_through_a_protocol():
    scorer = get_protocol("nnunet").scorer(1)
    scorer.add(square(4, 6)[None].float(), square(4, 4), spacing=(0.5, 2.0))
    assert scorer.per_case()["hd95"] == [pytest.approx(4.0)] and scorer.per_case()["assd"] == [pytest.approx(1.55)]


def test_against_a_scipy_oracle_on_real_kvasir_masks(kvasir):
    """HD95, ASSD and NSD on real polyp masks (and eroded, shifted predictions of them) against the definitions
    computed independently with scipy's exact Euclidean distance transform, with anisotropic spacing."""
    import numpy as np
    from PIL import Image
    from scipy import ndimage

    spacing, tolerance = (0.7, 1.3), 2.0
    for stem in sorted(p.stem for p in (kvasir / "masks").glob("*.png"))[:4]:
        truth = np.array(Image.open(kvasir / "masks" / f"{stem}.png").convert("L").resize((96, 80), Image.NEAREST))
        truth = truth > 127
        pred = np.roll(ndimage.binary_erosion(truth, iterations=2), (3, -2), axis=(0, 1))
        edges = [m ^ ndimage.binary_erosion(m) for m in (pred, truth)]
        to_truth = ndimage.distance_transform_edt(~edges[1], sampling=spacing)[edges[0]]
        to_pred = ndimage.distance_transform_edt(~edges[0], sampling=spacing)[edges[1]]
        both = np.concatenate([to_truth, to_pred])
        ours = surface_scores(torch.from_numpy(pred).long(), torch.from_numpy(truth).long(), 1, spacing, tolerance)
        assert ours["hd95"][0] == pytest.approx(max(np.percentile(to_truth, 95), np.percentile(to_pred, 95)), rel=1e-5)
        assert ours["assd"][0] == pytest.approx(both.mean(), rel=1e-5)
        assert ours["nsd"][0] == pytest.approx((both <= tolerance).mean(), rel=1e-6)
