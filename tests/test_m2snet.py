"""M2SNet / MSNet: parameter counts, the fixed filters, the losses, encoder weights, the polyp protocols."""

import numpy as np
import py_sod_metrics as sod
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torchvision.models import vgg16

import medseg
from medseg.config import load_recipe
from medseg.engine.module import SegmentationModule
from medseg.errors import MedsegError
from medseg.losses import create_loss
from medseg.metrics import get_protocol
from medseg.models import save_model
from medseg.models.m2snet import AllOnesRegionalSum


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected", [("m2snet", 27_692_585), ("msnet", 27_692_329)])
def test_parameter_counts(name, expected):
    assert n_params(medseg.create_model(name, 3, 1)) == expected


def test_any_multiple_of_32_gives_logits_at_input_size():
    model = medseg.create_model("m2snet", 3, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))


def test_fixed_all_ones_filters_never_train_and_are_never_saved(tmp_path):
    model = medseg.create_model("m2snet", 3, 1)
    regional = [m for m in model.modules() if isinstance(m, AllOnesRegionalSum)]
    assert len(regional) == 2 and [r.ones.shape[-1] for r in regional] == [3, 5]  # one shared Phi3 and Phi5
    assert all(torch.equal(r.ones, torch.ones_like(r.ones)) for r in regional)
    parameter_ids = {id(p) for p in model.parameters()}
    assert all(id(r.ones) not in parameter_ids and not r.ones.requires_grad for r in regional)
    model(torch.randn(2, 3, 64, 64)).mean().backward()
    assert all(r.ones.grad is None for r in regional)
    assert all(r.norm.weight.grad is not None for r in regional)  # their BN does train
    assert not any("ones" in key for key in model.state_dict())
    folder = save_model(model, tmp_path / "m2snet")
    assert not any("ones" in key for key in load_file(str(folder / "model.safetensors")))
    loaded = medseg.load_model(folder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-5)


def test_msnet_has_single_scale_units_only():
    assert not [m for m in medseg.create_model("msnet", 3, 1).modules() if isinstance(m, AllOnesRegionalSum)]


def test_local_encoder_weights_load_and_stay_out_of_the_saved_config(tmp_path):
    backbone = timm.create_model("res2net50d", pretrained=False, features_only=True)
    torch.save(backbone.state_dict(), tmp_path / "res2net50d.pth")
    model = medseg.create_model("m2snet", 3, 1, encoder_weights=str(tmp_path / "res2net50d.pth"))
    assert torch.equal(model.encoder.conv1[0].weight, backbone.conv1[0].weight)
    config = (save_model(model, tmp_path / "saved") / "config.json").read_text()
    assert "encoder_weights" not in config
    assert model.load_reports[0].loaded == len(backbone.state_dict()) and not model.load_reports[0].unused
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(MedsegError, match="no tensor .* matches timm res2net50d .*is it the right file"):
        medseg.create_model("m2snet", 3, 1, encoder_weights=str(tmp_path / "wrong.pth"))


def _pair():
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(2, 48, 48, dtype=torch.long)
    truth[:, 10:30, 12:40] = 1
    return torch.randn(2, 1, 48, 48, generator=g), truth


def test_structure_loss_reference_and_weighted_forms():
    logits, truth = _pair()
    g = truth[:, None].float()
    w = 1 + 5 * (F.avg_pool2d(g, 31, stride=1, padding=15) - g).abs()
    p = torch.sigmoid(logits)
    inter, union = (w * p * g).sum((2, 3)), (w * (p + g)).sum((2, 3))
    wiou = (1 - (inter + 1) / (union - inter + 1)).mean()
    bce = F.binary_cross_entropy_with_logits(logits, g, reduction="none")
    assert torch.allclose(create_loss("structure")(logits, truth), bce.mean() + wiou, atol=1e-6)
    weighted = ((w * bce).sum((2, 3)) / w.sum((2, 3))).mean() + wiou
    assert torch.allclose(create_loss("structure", wbce="weighted")(logits, truth), weighted, atol=1e-6)
    assert w.max() > 1.5 and w[0, 0, -1, 0] == 1  # heavier near edges, 1 far from them


def test_lossnet_is_frozen_outside_every_state_dict_and_passes_gradient(tmp_path):
    features = vgg16(weights=None).features
    torch.save(features.state_dict(), tmp_path / "vgg16_features.pth")
    recipe = load_recipe("m2snet", [f"loss.1.vgg_weights={tmp_path / 'vgg16_features.pth'}"])
    module = SegmentationModule(recipe.to_dict())
    lossnet = module.criterion.loss.terms[1]
    assert torch.equal(lossnet.vgg[0].weight, features[0].weight)
    assert not any("vgg" in key for key in module.state_dict())
    assert all(not p.requires_grad for p in lossnet.vgg.parameters())
    module.train()
    assert not lossnet.vgg.training
    folder = save_model(module.model, tmp_path / "model")
    assert not any("vgg" in key or "features" in key for key in load_file(str(folder / "model.safetensors")))
    logits, truth = _pair()
    logits.requires_grad_()
    lossnet(logits, truth).backward()
    assert logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in lossnet.vgg.parameters())


def test_lossnet_refuses_a_wrong_weights_file(tmp_path):
    torch.save({"0.weight": torch.zeros(2, 2)}, tmp_path / "bad.pth")
    with pytest.raises(MedsegError, match="no tensor .* matches torchvision vgg16 .*is it the right file"):
        create_loss("lossnet", vgg_weights=str(tmp_path / "bad.pth"))


@pytest.fixture(scope="module")
def kvasir_maps(kvasir):
    """Eight real Kvasir masks at their own sizes and soft predicted maps made from them."""
    g = torch.Generator().manual_seed(4)
    pairs = []
    for path in sorted((kvasir / "masks").glob("*.png"))[:8]:
        mask = torch.from_numpy(np.array(Image.open(path)) > 127).long()
        soft = F.avg_pool2d(mask[None, None].float(), 15, stride=1, padding=7)[0]
        soft = torch.roll(soft, shifts=(9, -6), dims=(1, 2)) + 0.2 * torch.randn(soft.shape, generator=g)
        pairs.append((soft.clamp(0, 1), mask))
    return pairs


def test_pranet_protocol_equals_pysodmetrics_directly(kvasir_maps):
    scorer = get_protocol("pranet").scorer(num_classes=1)
    dice = sod.FmeasureV2({"dice": sod.DICEHandler(with_dynamic=True, with_adaptive=False),
                           "iou": sod.IOUHandler(with_dynamic=True, with_adaptive=False)})
    wfm, sm, em, mae = sod.WeightedFmeasure(), sod.Smeasure(), sod.Emeasure(), sod.MAE()
    for prob, mask in kvasir_maps:
        scorer.add(prob, mask)
        prediction = np.round(prob[0].numpy() * 255).astype(np.uint8)
        truth = mask.numpy().astype(np.uint8) * 255
        for metric in (dice, wfm, sm, em, mae):
            metric.step(prediction, truth)
    ours = {name: values["value"] for name, values in scorer.summary().items()}
    sweep, curve = dice.get_results(), em.get_results()["em"]["curve"]
    theirs = {"mean_dice": sweep["dice"]["dynamic"].mean(), "mean_iou": sweep["iou"]["dynamic"].mean(),
              "wfm": wfm.get_results()["wfm"], "sm": sm.get_results()["sm"], "mean_em": curve.mean(),
              "max_em": curve.max(), "mae": mae.get_results()["mae"]}
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(float(value), abs=1e-12), name
    per_case = scorer.per_case()
    assert len(per_case["mean_dice"]) == 8
    assert np.mean(per_case["mean_dice"]) == pytest.approx(ours["mean_dice"], abs=1e-12)


def test_m2snet_protocol_soft_dice_and_iou_follow_the_authors_script(kvasir_maps):
    scorer = get_protocol("m2snet").scorer(num_classes=1)
    expected_dice, expected_iou = [], []
    for prob, mask in kvasir_maps:
        scorer.add(prob, mask)
        pred = np.round(prob[0].numpy() * 255).astype(np.uint8) / 255
        pred = (pred - pred.min()) / (pred.max() - pred.min())
        gt = mask.numpy().astype(bool)
        expected_dice.append((2 * (pred * gt).sum() + 1e-5) / (pred.sum() + gt.sum() + 1e-5))
        expected_iou.append((((pred > 0.5) & gt).sum() + 1e-5) / (((pred > 0.5) | gt).sum() + 1e-5))
    summary = scorer.summary()
    assert summary["soft_dice"]["value"] == pytest.approx(np.mean(expected_dice), abs=1e-9)
    assert summary["iou"]["value"] == pytest.approx(np.mean(expected_iou), abs=1e-9)
    assert {"adaptive_em", "wfm", "sm", "mae", "max_f", "adaptive_f"} <= set(summary)
    with pytest.raises(MedsegError, match="scores binary maps"):
        get_protocol("pranet").scorer(num_classes=3)
