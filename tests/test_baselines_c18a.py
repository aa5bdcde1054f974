"""More baselines of the seed papers' tables (issue 18, second round): Inf-Net (M2SNet Table 3), CaraNet and
DenseASPP (STS-Net Table 1). Parameter counts pinned to their sources, forward shapes at a small size, local encoder
weights, and a short CPU training check per network."""

import pytest
import timm
import torch
from tests.baseline_training import check_edge_extra_loss, n_params, recipe_training_losses, toy_batch

import medseg
from medseg.config import load_recipe
from medseg.errors import MedsegError
from medseg.losses import build_loss

RES2NET_FC = 2048 * 1000 + 1000  # the Res2Net ImageNet classifier the reference codes build and never call


# Inf-Net: the reference code DengPingFan/Inf-Net Code/model_lung_infection/InfNet_Res2Net.py, Inf_Net(32, 1), has
# 33,121,721 parameters, of which 2,049,000 are Res2Net's unused ImageNet classifier resnet.fc.
INFNET_REFERENCE = 33_121_721


def test_infnet_parameter_count_is_the_reference_code_less_its_unused_classifier():
    assert n_params(medseg.create_model("infnet", 3, 1)) == INFNET_REFERENCE - RES2NET_FC == 31_072_721


def test_infnet_outputs_edge_guidance_and_local_weights(tmp_path):
    model = medseg.create_model("infnet", 3, 1)
    x = torch.randn(2, 3, 64, 96)
    outputs = model.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 4  # S2, S3, S4, S_g; the edge map is the extra loss
    assert all(o.shape == (2, 1, 64, 96) for o in outputs)
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 1, 64, 96)
    # the edge guidance (64 ch) is concatenated after each reverse attention's 1x1 reduction
    assert [ra.inner[0][0].in_channels for ra in model.reverse] == [256 + 64, 64 + 64, 64 + 64]
    with pytest.raises(MedsegError, match="binary only"):
        medseg.create_model("infnet", 3, 2)
    backbone = timm.create_model("res2net50d", pretrained=False)
    torch.save(backbone.state_dict(), tmp_path / "res2net50d.pth")
    loaded = medseg.create_model("infnet", 3, 1, encoder_weights=str(tmp_path / "res2net50d.pth"))
    assert torch.equal(loaded.encoder.layer1[0].conv1.weight, backbone.layer1[0].conv1.weight)


def test_infnet_edge_map_is_trained_against_the_masks_edges():
    model = medseg.create_model("infnet", 3, 1)
    # the edge map is the edge branch's last conv-BN; the reverse attention reads only the guidance before it
    check_edge_extra_loss(model, model.edge.out, unreached=model.reverse[0].out[0].weight)
    torch.manual_seed(0)
    images, truth = toy_batch(64)
    criterion = build_loss(load_recipe("infnet").to_dict()["loss"], [1.0] * 4)
    model.train().zero_grad()
    criterion(model(images), truth)[0].backward()
    assert model.edge.out[0].weight.grad is None  # the region maps alone do not train the edge map
    assert set(model.extra_losses(truth)) == {"edge"}  # which that forward kept for the extra loss


def test_infnet_recipe_trains_its_edge_through_the_engine():
    from medseg.engine.module import SegmentationModule

    module = SegmentationModule(load_recipe("infnet", ["data.size=64"]).to_dict())
    images, truth = toy_batch(64)
    torch.manual_seed(0)
    loss, parts = module.training_loss({"image": images, "mask": truth})
    assert set(parts) == {"structure", "edge"} and torch.isfinite(parts["edge"])
    assert torch.allclose(loss, parts["structure"] + 1.0 * parts["edge"])  # code: loss1 (edge BCE) weight 1


def test_infnet_recipe_trains_on_cpu_and_follows_the_codes_schedule():
    recipe = load_recipe("infnet")
    assert recipe.train.deep_supervision_weights == [1.0, 1.0, 1.0, 1.0]  # S2, S3, S4, S_g
    assert recipe.train.extra_loss_weights == {"edge": 1.0}
    assert recipe.schedule.milestones == list(range(49, 99)) and recipe.train.epochs == 99  # x0.1 per epoch from 50
    first, *_, last = recipe_training_losses("infnet", size=64)
    assert last < first


# CaraNet: the reference code AngeLouCN/CaraNet CaraNet.py, caranet(), has 46,642,560 parameters, STS-Net Table 1's
# "46.64" M; 2,049,000 of them are Res2Net-101's unused ImageNet classifier resnet.fc.
CARANET_REFERENCE = 46_642_560


def test_caranet_parameter_count_is_the_reference_code_and_sts_nets_table_less_the_unused_classifier():
    model = medseg.create_model("caranet", 3, 1)
    assert n_params(model) == CARANET_REFERENCE - RES2NET_FC == 44_593_560
    assert round(CARANET_REFERENCE / 1e6, 2) == 46.64  # STS-Net Table 1


def test_caranet_outputs_context_module_and_axial_attention():
    from medseg.models.caranet import AxialSelfAttention, ContextModule

    model = medseg.create_model("caranet", 3, 1)
    outputs = model.train()(torch.randn(2, 3, 64, 96))
    assert len(outputs) == 4 and all(o.shape == (2, 1, 64, 96) for o in outputs)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    context = ContextModule(32, 8)
    assert [branch[0][0].dilation[0] for branch in context.branches] == [1, 3, 5, 9]  # code: d = 8
    x = torch.randn(1, 32, 4, 6)
    assert torch.equal(AxialSelfAttention(32, "w")(x), x)  # gamma starts at 0: the identity
    with pytest.raises(MedsegError, match="binary only"):
        medseg.create_model("caranet", 3, 2)


def test_caranet_recipe_trains_on_cpu():
    first, *_, last = recipe_training_losses("caranet", size=64)
    assert last < first


# DenseASPP: the reference code DeepMotionAIResearch/DenseASPP models/DenseASPP.py with cfgs/DenseASPP121.py has
# 8,265,857 parameters for one output and 8,280,851 for its 19 Cityscapes classes. (STS-Net Table 1's 46.15 M matches
# none of the authors' configurations.)
def test_denseaspp_parameter_count_matches_the_reference_code():
    assert n_params(medseg.create_model("denseaspp", 3, 1)) == 8_265_857
    assert n_params(medseg.create_model("denseaspp", 3, 2)) == 8_265_857 + 833  # the softmax head of its recipe
    assert n_params(medseg.create_model("denseaspp", 3, 19)) == 8_280_851


def test_denseaspp_is_dilated_to_stride_8_loads_densenet121_and_trains(tmp_path):
    model = medseg.create_model("denseaspp", 3, 2)
    with torch.no_grad():
        assert model.encoder(torch.randn(1, 3, 64, 96)).shape == (1, 1024, 8, 12)  # output stride 8
        assert model.eval()(torch.randn(1, 3, 64, 96)).shape == (1, 2, 64, 96)
    assert [layer[-2].dilation[0] for layer in model.aspp] == [3, 6, 12, 18, 24]
    import torchvision

    densenet = torchvision.models.densenet121(weights=None)
    torch.save(densenet.state_dict(), tmp_path / "densenet121.pth")
    loaded = medseg.create_model("denseaspp", 1, 1, encoder_weights=str(tmp_path / "densenet121.pth"))
    assert torch.equal(loaded.encoder.denseblock4.denselayer16.conv2.weight,
                       densenet.features.denseblock4.denselayer16.conv2.weight)
    assert loaded.encoder.conv0.weight.shape[1] == 1
    assert "features.norm5.weight" in loaded.load_reports[0].unused  # DenseASPP's norm5 follows its own transition


def test_denseaspp_recipe_trains_on_cpu():
    recipe = load_recipe("denseaspp")
    assert (recipe.model.num_classes, recipe.optim.lr, recipe.schedule.name) == (2, 3e-4, "poly")
    losses = recipe_training_losses("denseaspp", size=32, steps=3, optimiser="recipe")
    assert losses[-1] < losses[0]
