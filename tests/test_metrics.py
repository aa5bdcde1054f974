"""Metrics against segmentation_models_pytorch and torchmetrics on real Kvasir-SEG masks."""

import math

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.functional.classification import binary_stat_scores, multiclass_stat_scores

from medseg.metrics import case_scores, confusion_counts, get_protocol, predict_labels, summarize, summary_metrics

SMP_METRICS = {"dice": smp.metrics.f1_score, "iou": smp.metrics.iou_score, "sensitivity": smp.metrics.sensitivity,
               "specificity": smp.metrics.specificity, "precision": smp.metrics.precision,
               "accuracy": smp.metrics.accuracy}


@pytest.fixture(scope="module")
def kvasir_pairs(kvasir):
    """12 real masks at 192 px and soft predictions made from them (blurred, shifted, noisy), plus an empty
    mask with an empty prediction and an empty mask with a false positive."""
    stems = sorted(p.stem for p in (kvasir / "masks").glob("*.png"))[:12]
    masks = torch.stack([torch.from_numpy(np.array(Image.open(kvasir / "masks" / f"{s}.png")
                                                   .resize((192, 192), Image.NEAREST)) > 127)
                         for s in stems]).long()
    g = torch.Generator().manual_seed(1)
    soft = F.avg_pool2d(masks[:, None].float(), 9, stride=1, padding=4)
    soft = torch.roll(soft, shifts=(7, -5), dims=(2, 3)) + 0.25 * torch.randn(soft.shape, generator=g)
    probs = soft.clamp(0, 1)
    masks = torch.cat([masks, torch.zeros(2, 192, 192, dtype=torch.long)])
    probs = torch.cat([probs, torch.zeros(1, 1, 192, 192), torch.zeros(1, 1, 192, 192)])
    probs[-1, 0, 10:30, 10:30] = 0.9
    return probs, masks


def test_counts_equal_torchmetrics_per_image(kvasir_pairs):
    probs, masks = kvasir_pairs
    ours = confusion_counts(predict_labels(probs, 0.5), masks, num_classes=1)[:, 1]  # foreground class
    theirs = binary_stat_scores(probs[:, 0], masks, threshold=0.5, multidim_average="samplewise")  # tp fp tn fn sup
    assert torch.equal(ours[:, 0], theirs[:, 0]) and torch.equal(ours[:, 1], theirs[:, 1])
    assert torch.equal(ours[:, 2], theirs[:, 3]) and torch.equal(ours[:, 3], theirs[:, 2])


@pytest.mark.parametrize("aggregation,reduction", [("per-image", "micro-imagewise"), ("pooled", "micro")])
def test_metrics_equal_smp(kvasir_pairs, aggregation, reduction):
    probs, masks = kvasir_pairs
    counts = confusion_counts(predict_labels(probs, 0.5), masks, num_classes=1)
    tp, fp, fn, tn = smp.metrics.get_stats(probs, masks[:, None], mode="binary", threshold=0.5)
    assert torch.equal(counts[:, 1, 0:1], tp) and torch.equal(counts[:, 1, 3:4], tn)
    protocol = get_protocol("paper") if aggregation == "per-image" else get_protocol("pooled")
    summary = summarize(counts, protocol)
    for name, fn_ in SMP_METRICS.items():
        expected = fn_(tp, fp, fn, tn, reduction=reduction, zero_division=1.0).item()
        assert summary[name]["value"] == pytest.approx(expected, abs=1e-6), name


def test_mdice_and_miou_average_foreground_and_background(kvasir_pairs):
    probs, masks = kvasir_pairs
    counts = confusion_counts(predict_labels(probs, 0.5), masks, num_classes=1)
    scores = summary_metrics(counts, empty="one")
    fg = smp.metrics.get_stats(probs, masks[:, None], mode="binary", threshold=0.5)
    bg = smp.metrics.get_stats(1 - probs, 1 - masks[:, None], mode="binary", threshold=0.5 + 1e-7)
    dice_fg, dice_bg = (smp.metrics.f1_score(*s, reduction="none", zero_division=1.0)[:, 0] for s in (fg, bg))
    iou_fg, iou_bg = (smp.metrics.iou_score(*s, reduction="none", zero_division=1.0)[:, 0] for s in (fg, bg))
    assert torch.allclose(scores["mdice"], ((dice_fg + dice_bg) / 2).double(), atol=1e-6)
    assert torch.allclose(scores["miou"], ((iou_fg + iou_bg) / 2).double(), atol=1e-6)
    assert (scores["mdice"][:12] > scores["dice"][:12]).all()  # background inflates it (STS-Net reports this)


def test_multiclass_counts_equal_torchmetrics(kvasir_pairs):
    _, masks = kvasir_pairs
    labels = masks.clone()
    labels[:, :96][labels[:, :96] == 1] = 2  # polyp in the upper half becomes class 2
    g = torch.Generator().manual_seed(2)
    pred = torch.where(torch.rand(labels.shape, generator=g) < 0.1, torch.randint(0, 3, labels.shape, generator=g),
                       labels)
    ours = confusion_counts(pred, labels, num_classes=3)
    theirs = multiclass_stat_scores(pred, labels, num_classes=3, average=None, multidim_average="samplewise")
    assert torch.equal(ours[..., 0], theirs[..., 0]) and torch.equal(ours[..., 1], theirs[..., 1])
    assert torch.equal(ours[..., 2], theirs[..., 3]) and torch.equal(ours[..., 3], theirs[..., 2])
    scores = summary_metrics(ours, empty="nan")
    assert "dice_class2" in scores and scores["dice"].shape == (labels.shape[0],)


def test_empty_rules_and_the_nnunet_protocol():
    empty = torch.zeros(1, 8, 8, dtype=torch.long)
    counts = confusion_counts(empty, empty, 1)
    assert summary_metrics(counts, "one")["dice"].item() == 1.0
    assert summary_metrics(counts, "zero")["dice"].item() == 0.0
    assert math.isnan(summary_metrics(counts, "nan")["dice"].item())
    full = torch.ones(1, 8, 8, dtype=torch.long)
    both = confusion_counts(torch.cat([empty, full]), torch.cat([empty, full]), 1)
    nnunet = summarize(both, get_protocol("nnunet"))
    assert nnunet["dice"] == {"value": 1.0, "std": 0.0, "median": 1.0, "n": 1, "n_nan": 1}
    assert set(case_scores(both, get_protocol("nnunet"))) == {"dice", "iou", "precision", "sensitivity"}


def test_threshold_is_inclusive_and_multiclass_uses_argmax():
    probs = torch.tensor([0.49, 0.5, 0.51]).view(1, 1, 1, 3)
    assert predict_labels(probs, 0.5).tolist() == [[[0, 1, 1]]]
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]]).T.reshape(1, 3, 1, 2)
    assert predict_labels(logits).tolist() == [[[1, 0]]]
