"""The baselines of M2SNet's comparison tables (seed 001, Tables 1-6): parameter counts pinned to their sources,
forward shapes at a small size, local encoder weights, and a short CPU training check per network."""

import pytest
import timm
import torch
import torchvision
from tests.baseline_training import n_params, recipe_training_losses, toy_batch, training_losses

import medseg
from medseg.config import load_recipe
from medseg.errors import MedsegError
from medseg.losses import build_loss

# PraNet: the reference code's count on DengPingFan/PraNet lib/PraNet_Res2Net.py is 32,547,319, which includes the
# Res2Net ImageNet classifier resnet.fc (2048 * 1000 + 1000 = 2,049,000) that PraNet never calls.
PRANET_REFERENCE, RES2NET_FC = 32_547_319, 2048 * 1000 + 1000


def test_pranet_parameter_count_is_the_reference_code_less_its_unused_classifier():
    assert n_params(medseg.create_model("pranet", 3, 1)) == PRANET_REFERENCE - RES2NET_FC == 30_498_319


def test_pranet_deep_supervision_in_training_and_one_map_in_eval():
    model = medseg.create_model("pranet", 3, 1)
    x = torch.randn(1, 3, 64, 96)
    outputs = model.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 4
    assert all(o.shape == (1, 1, 64, 96) for o in outputs)
    with torch.no_grad():
        single = model.eval()(x)
    assert single.shape == (1, 1, 64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))
    with pytest.raises(MedsegError, match="binary only"):
        medseg.create_model("pranet", 3, 2)


def test_pranet_reverse_attention_adds_a_residual_to_the_coarser_map():
    from medseg.models.pranet import ReverseAttention

    attention = ReverseAttention(8, 4, 3, 2, 3).eval()
    features = torch.randn(1, 8, 6, 6)
    certain = torch.full((1, 1, 6, 6), 30.0)  # sigmoid = 1: reverse attention erases every feature
    with torch.no_grad():
        residual = attention(torch.zeros_like(features), certain) - certain
        assert torch.allclose(attention(features, certain) - certain, residual, atol=1e-5)


def test_pranet_loads_a_local_res2net50d_file(tmp_path):
    backbone = timm.create_model("res2net50d", pretrained=False)  # with its fc, which is reported unused
    torch.save(backbone.state_dict(), tmp_path / "res2net50d.pth")
    model = medseg.create_model("pranet", 3, 1, encoder_weights=str(tmp_path / "res2net50d.pth"))
    assert torch.equal(model.encoder.layer4[0].conv1.weight, backbone.layer4[0].conv1.weight)
    assert any("fc" in key for key in model.load_reports[0].unused)


def test_pranet_recipe_trains_on_cpu():
    first, *_, last = recipe_training_losses("pranet", size=64)  # 2 x 2 at 1/32: BN needs more than 1 x 1
    assert last < first


# ResUNet++: the paper's "4.07M" is Keras' total of DebeshJha/ResUNetPlusPlus m_resunet.py, which counts BatchNorm's
# moving mean and variance too; resunet++_pytorch.py (the same network) has 4,062,993 trainable parameters.
def test_resunetpp_parameter_count_matches_the_reference_code_and_the_papers_keras_total():
    model = medseg.create_model("resunetpp", 3, 1)
    assert n_params(model) == 4_062_993
    moving_statistics = sum(b.numel() for name, b in model.named_buffers() if name.endswith(("running_mean",
                                                                                           "running_var")))
    assert n_params(model) + moving_statistics == 4_070_385  # "4.07M"


def test_resunetpp_forward_and_its_recipe_optimiser():
    from medseg.engine.optim import build_optimizer, build_scheduler

    model = medseg.create_model("resunetpp", 3, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 72)).shape == (1, 2, 64, 72)
    recipe = load_recipe("resunetpp")
    optimizer = build_optimizer(model, recipe.optim)
    assert isinstance(optimizer, torch.optim.NAdam) and optimizer.defaults["eps"] == 1e-7
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.epochs, 10)["scheduler"]
    assert scheduler.min_lrs == [1e-6] * len(optimizer.param_groups)


def test_resunetpp_recipe_trains_on_cpu():
    first, *_, last = recipe_training_losses("resunetpp", size=32)
    assert last < first


# U-Net / UNet++ / Attention U-Net on Res2Net-50 (M2SNet Tables 1-4, backbone "R2-50"): M2SNet gives no code or count
# that fits (its Table 6 says ~7.2M / ~19.2M / ~12.6M, below the R2-50 encoder's own 23,669,352), so the pinned counts
# are those of the smp compositions (smp Unet / UnetPlusPlus defaults on tu-res2net50d; Oktay gates on the skips).
R2_COMPOSITIONS = {"unet_res2net50": 32_682_425, "unetpp_res2net50": 49_147_065,
                   "attention_unet_res2net50": 34_511_653}
RES2NET50_ENCODER = 23_669_352


@pytest.mark.parametrize("name", R2_COMPOSITIONS)
def test_res2net50_baselines_counts_and_shapes(name):
    model = medseg.create_model(name, 3, 1)
    assert n_params(model) == R2_COMPOSITIONS[name]
    assert n_params(model.network.encoder) == RES2NET50_ENCODER == 27_692_585 - 4_023_233  # m2snet's encoder
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)


def test_attention_unet_res2net50_gates_four_skips_and_records_the_finest(tmp_path):
    from medseg.models.blocks import AttentionGate

    model = medseg.create_model("attention_unet_res2net50", 3, 1).eval()
    gates = [m for m in model.modules() if isinstance(m, AttentionGate)]
    assert [g.skip[0].in_channels for g in gates] == [1024, 512, 256, 64]
    model.record_attention(True)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    (coefficients,) = model.attention_maps().values()
    assert coefficients.shape == (1, 1, 32, 32) and 0 <= coefficients.min() <= coefficients.max() <= 1
    backbone = timm.create_model("res2net50d", pretrained=False)
    torch.save(backbone.state_dict(), tmp_path / "res2net50d.pth")
    loaded = medseg.create_model("unetpp_res2net50", 1, 1, encoder_weights=str(tmp_path / "res2net50d.pth"))
    assert torch.equal(loaded.network.encoder.model.layer3[1].conv3.weight, backbone.layer3[1].conv3.weight)
    assert loaded.network.encoder.model.conv1[0].weight.shape[1] == 1  # the first conv adapted to one channel


def test_attention_unet_res2net50_trains_on_cpu():  # the U-Net decoder with gates: covers unet_res2net50's too
    torch.manual_seed(0)
    model = medseg.create_model("attention_unet_res2net50", 3, 1).train()
    criterion = build_loss([{"name": "bce"}, {"name": "dice"}])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = training_losses(model, criterion, optimizer, *toy_batch(32), steps=2)
    assert losses[-1] < losses[0]


# ACSNet: the paper states no count; ReaFly/ACSNet models/ACSNet.py, ACSNet(1), has 29,450,709 parameters.
def test_acsnet_parameter_count_matches_the_reference_code():
    assert n_params(medseg.create_model("acsnet", 3, 1)) == 29_450_709


def test_acsnet_side_outputs_at_their_own_sizes_and_the_main_one_in_eval(tmp_path):
    from medseg.models.acsnet import NonLocalBlock, local_context_attention

    model = medseg.create_model("acsnet", 3, 1)
    outputs = model.train()(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape[-2:]) for o in outputs] == [(64, 96), (32, 48), (16, 24), (8, 12), (4, 6)]
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    features = torch.randn(1, 4, 8, 8)
    certain, unsure = torch.full((1, 1, 8, 8), 50.0), torch.zeros(1, 1, 8, 8)
    assert torch.allclose(local_context_attention(features, certain), features)  # confident: unchanged
    assert torch.allclose(local_context_attention(features, unsure), 2 * features)  # p = 0.5: doubled
    assert torch.equal(NonLocalBlock(8).eval()(features.repeat(1, 2, 1, 1)), features.repeat(1, 2, 1, 1))  # identity
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    loaded = medseg.create_model("acsnet", 1, 1, encoder_weights=str(tmp_path / "resnet34.pth"))
    assert loaded.encoder.conv1.weight.shape[1] == 1 and "fc.weight" in loaded.load_reports[0].unused
    with pytest.raises(MedsegError, match="binary only"):
        medseg.create_model("acsnet", 3, 3)
    with pytest.raises(ValueError, match="at least 64 px"):
        model(torch.randn(1, 3, 32, 64))


# M2SNet Table 7 ablations: options of m2snet / msnet; the defaults stay the pinned networks.
def test_m2snet_ablation_orders_and_addition_units():
    from medseg.models.m2snet import AllOnesRegionalSum, SubtractionUnit

    counts = [n_params(medseg.create_model("msnet", 3, 1, orders=n)) for n in range(5)]
    assert counts[4] == n_params(medseg.create_model("msnet", 3, 1)) == 27_692_329
    assert counts == sorted(set(counts))  # each order adds units
    assert n_params(medseg.create_model("msnet", 3, 1, unit="addition")) == counts[4]  # AU: no extra parameters
    fpn = medseg.create_model("m2snet", 3, 1, orders=0).eval()
    assert not [m for m in fpn.modules() if isinstance(m, (SubtractionUnit, AllOnesRegionalSum))]
    with torch.no_grad():
        assert fpn(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    unit = SubtractionUnit(addition=True).eval()
    a, b = torch.randn(1, 64, 4, 4), torch.randn(1, 64, 4, 4)
    with torch.no_grad():
        assert torch.allclose(unit(a, b, []), unit.fuse(a + b))
    with pytest.raises(MedsegError, match="orders must be 0-4"):
        medseg.create_model("m2snet", 3, 1, orders=5)



def test_acsnet_recipe_trains_on_cpu():  # side outputs at 1/2..1/16 against the mask resized by the criterion
    first, *_, last = recipe_training_losses("acsnet", size=64)
    assert last < first


def test_pranet_recipe_clamps_gradients_by_value_in_the_trainer(tmp_path):
    from medseg.engine.precision import NumericMode
    from medseg.engine.run import Run
    from medseg.engine.train import build_trainer

    recipe = load_recipe("pranet")
    trainer = build_trainer(recipe, Run(tmp_path), NumericMode("32-true", False, "test"), progress=False)
    assert trainer.gradient_clip_val == 0.5 and trainer.gradient_clip_algorithm == "value"
    assert load_recipe("unet").train.gradient_clip_algorithm == "norm"  # every other recipe keeps the norm
