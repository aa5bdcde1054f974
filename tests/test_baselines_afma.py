"""DeepLabV3 + AFMA (Sang et al., IEEE TPAMI 2023), the "DeepLabV3AFMA" baseline of STS-Net's Table 1: parameter count
pinned to its sources, forward shapes, the gold AFMA and the output modification on tiny masks worked out by hand,
the AFMA loss, and a short CPU training check with its recipe (CE x 5 + AFMA MSE)."""

import pytest
import torch
import torchvision
from tests.baseline_training import n_params, recipe_training_losses

import medseg
from medseg.errors import MedsegError
from medseg.models.afma import PATCH, gold_afma, modify_output

# smp DeepLabV3 (OS 8, ASPP 256, rates 12/24/36) on resnext50_32x4d, 3 in, 2 classes: 39,105,858 (the count of
# `deeplabv3`); AFMA as the authors' code builds it (ShengtianSang/AFMA models/attonimage/encoder_channelatt_img.py)
# for 2 classes at att_depth 2: conv_img 3*64*49+64 and 64*2*9+2, conv_feamap 256*2+2 (layer1 has 256 channels),
# resolution_trans 100*200 + 200*100. STS-Net Table 1 prints 39.15M (each att_depth gives 39.156-39.158 M).
DEEPLABV3_RESNEXT50 = 39_105_858
AFMA_PARAMETERS = (3 * 64 * 49 + 64) + (64 * 2 * 9 + 2) + (256 * 2 + 2) + (100 * 200 + 200 * 100)


def test_parameter_count_is_deeplabv3_resnext50_plus_the_codes_afma():
    assert n_params(medseg.create_model("deeplabv3", 3, 2)) == DEEPLABV3_RESNEXT50
    model = medseg.create_model("deeplabv3_afma", 3, 2)
    assert n_params(model) == DEEPLABV3_RESNEXT50 + AFMA_PARAMETERS == 39_156_998
    assert int(n_params(model) / 1e4) / 100 == 39.15  # STS-Net Table 1, truncated to two decimals
    assert n_params(medseg.create_model("deeplabv3_afma", 3, 2, att_depth=1)) == 39_156_998 - (256 - 64) * 2


def test_forward_shapes_training_cache_and_limits():
    model = medseg.create_model("deeplabv3_afma", 3, 2)
    x = torch.randn(2, 3, 64, 96)
    out = model.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 64, 96)
    assert model.kept_for_losses.shape == (2, 2, 6 * 9, 1 * 2)  # 10 px image patches x patches of the 1/4 map
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 128, 128)).shape == (1, 2, 128, 128)
    assert model.kept_for_losses is None  # eval forwards keep nothing for the loss
    with pytest.raises(ValueError, match="at least 40 px"):
        model(torch.randn(1, 3, 32, 64))
    binary = medseg.create_model("deeplabv3_afma", 3, 1).eval()  # a sigmoid head: AFMA for the foreground alone
    with torch.no_grad():
        assert binary(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert binary.afma.feature_conv.out_channels == 1
    with pytest.raises(MedsegError, match="att_depth"):
        medseg.create_model("deeplabv3_afma", 3, 2, att_depth=0)


def test_gold_afma_of_a_quadrant_mask_by_hand():
    # 20 x 20 mask, foreground = the top-left 10 x 10 image patch; pooled by 2 it is the top-left 5 x 5 of the one
    # 10 x 10 feature patch. Foreground: image patch 0 (100 ones) . feature patch (25 ones) / 100 = 0.25, other
    # patches 0. Background: patches 1-3 (100 ones) . (75 ones) / 100 = 0.75, patch 0 (zeros) 0.
    labels = torch.zeros(1, 20, 20, dtype=torch.long)
    labels[0, :10, :10] = 1
    gold = gold_afma(labels, 2, factor=2)
    assert gold.shape == (1, 2, 4, 1)
    assert torch.equal(gold[0, 1, :, 0], torch.tensor([0.25, 0.0, 0.0, 0.0]))
    assert torch.equal(gold[0, 0, :, 0], torch.tensor([0.0, 0.75, 0.75, 0.75]))
    assert torch.equal(gold_afma(labels, 1, factor=2), gold[:, 1:])  # a sigmoid head: the foreground's alone


def test_output_modification_by_hand():
    # predicted foreground = the top-left 10 x 10 of a 20 x 20 map; pooled by 2 its feature patch holds ones at its
    # top-left 5 x 5. An AFMA of ones (one feature patch, so its row normalisation is 1) copies that pattern into
    # every image patch: the logits double at rows and columns 0-4 of each 10 x 10 patch and stay elsewhere.
    logits = torch.full((1, 2, 20, 20), 1.0)
    logits[0, 1, :10, :10] = 3.0
    afma = torch.ones(1, 2, 4, 1)
    out = modify_output(logits, afma, factor=2)
    grid = torch.zeros(20, 20, dtype=torch.bool)
    for r in (0, 10):
        for c in (0, 10):
            grid[r: r + 5, c: c + 5] = True
    close = lambda a, b: torch.allclose(a, b, atol=1e-4)  # noqa: E731  (the code's 1e-5 in the row normalisation)
    assert close(out[0, 1], torch.where(grid, 2 * logits[0, 1], logits[0, 1]))
    background = torch.zeros(20, 20, dtype=torch.bool)  # background pooled: ones except the top-left 5 x 5
    for r in (0, 10):
        for c in (0, 10):
            background[r: r + 10, c: c + 10] = True
            background[r: r + 5, c: c + 5] = False
    assert close(out[0, 0], torch.where(background, 2.0, 1.0))
    assert torch.equal(modify_output(logits, torch.zeros_like(afma), factor=2), logits)  # no attention, no change
    foreground = logits[:, 1:] - logits[:, :1]  # the same prediction as a sigmoid logit (> 0 where class 1 wins)
    binary = modify_output(foreground, afma[:, 1:], factor=2)[0, 0]
    assert close(binary, torch.where(grid, 2 * foreground[0, 0], foreground[0, 0]))


def test_afma_loss_is_finite_has_gradient_and_is_used_once(tmp_path):
    torch.manual_seed(0)
    model = medseg.create_model("deeplabv3_afma", 3, 2).train()
    labels = torch.zeros(2, 80, 80, dtype=torch.long)
    labels[:, 20:40, 30:50] = 1
    model(torch.randn(2, 3, 80, 80))
    losses = model.extra_losses(labels)
    assert list(losses) == ["afma"] and torch.isfinite(losses["afma"]) and losses["afma"] > 0
    losses["afma"].backward()
    for module in (model.afma.image_conv, model.afma.feature_conv, model.afma.resolution):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert model.network.encoder.layer1[0].conv1.weight.grad.abs().sum() > 0  # the feature AFMA reads
    with pytest.raises(MedsegError, match="training forward"):
        model.extra_losses(labels)  # the cache is cleared after use
    assert PATCH == 10


def test_local_resnext50_encoder_weights_load(tmp_path):
    torch.save(torchvision.models.resnext50_32x4d(weights=None).state_dict(), tmp_path / "resnext50.pth")
    model = medseg.create_model("deeplabv3_afma", 1, 2, encoder_weights=str(tmp_path / "resnext50.pth"))
    assert model.network.encoder.conv1.weight.shape[1] == 1 and model.afma.image_conv[0].in_channels == 1
    assert "fc.weight" in model.load_reports[0].unused


def test_recipe_trains_on_cpu():
    losses = recipe_training_losses("deeplabv3_afma", size=64, steps=2, optimiser="recipe")
    assert losses[-1] < losses[0]
