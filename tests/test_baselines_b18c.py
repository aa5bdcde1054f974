"""Baselines of the STS-Net and FocusNet tables (issue 18, part c): parameter counts pinned to their sources,
forward shapes, a few optimisation steps with each recipe's own loss and optimiser."""

from __future__ import annotations

import pytest
import torch
from tests.baseline_training import n_params

import medseg
from medseg.config import load_recipe
from medseg.engine.optim import build_optimizer
from medseg.losses import build_loss
from medseg.models.pretrained import load_encoder_weights


def blob_batch(batch: int, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a bright square on noise, and its mask: a task a few steps can start to learn."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, channels, size, size, generator=generator) * 0.2
    masks = torch.zeros(batch, 1, size, size)
    for i in range(batch):
        top, left = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
        images[i, :, top:top + size // 3, left:left + size // 3] += 0.8
        masks[i, :, top:top + size // 3, left:left + size // 3] = 1.0
    return images, masks


def recipe_model(recipe_name: str, *overrides: str) -> tuple[torch.nn.Module, object]:
    """(network, recipe): the network built with the recipe's model options (no weights file)."""
    torch.manual_seed(0)
    recipe = load_recipe(recipe_name, list(overrides))
    settings = recipe.model.model_dump(exclude={"name", "in_channels", "num_classes", "weights", "encoder_weights"})
    model = medseg.create_model(recipe.model.name, recipe.model.in_channels, recipe.model.num_classes, **settings)
    return model, recipe


def losses_of_a_few_steps(model: torch.nn.Module, recipe, size: int, steps: int = 3) -> list[float]:
    """Training losses of `steps` steps on one fixed batch with the recipe's loss and optimiser (its lr)."""
    torch.manual_seed(0)  # dropout draws
    criterion = build_loss([t.model_dump() for t in recipe.loss])
    optimizer = build_optimizer(model, recipe.optim)
    images, masks = blob_batch(2, recipe.model.in_channels, size)
    target = masks if recipe.model.num_classes == 1 else masks[:, 0].long()
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = criterion(model(images), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# --- TransUNet -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transunet():
    """The reference code's Synapse configuration (224 px grid, 9 classes), built once for every check."""
    return recipe_model("transunet", "model.num_classes=9")


def test_transunet_parameter_count_is_the_reference_code_plus_the_class_position_entry(transunet):
    # Beckschen/TransUNet networks/vit_seg_modeling.py, R50-ViT-B_16, img_size 224, n_skip 3, its 9 Synapse
    # classes: 105,277,081 (counted by building the reference code; 105,276,066 for 2 classes). Ours keeps timm's
    # layout, whose position embedding has one more (class) entry of 768 values.
    assert n_params(transunet[0]) == 105_277_081 + 768


def test_transunet_loads_a_timm_file_and_resamples_its_position_grid(transunet, tmp_path):
    import timm

    model, _ = transunet
    file = tmp_path / "vit_base_r50_s16_224.pth"
    torch.save(timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0).state_dict(), file)
    report = load_encoder_weights(model, file)
    assert report.loaded == len(model.encoder.state_dict()) and not report.unused
    assert "encoder.cls_token" in model.state_dict() and "encoder.cls_token" not in dict(model.named_parameters())
    model.eval()
    with torch.no_grad():  # other grids than its 14 x 14 one
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 9, 32, 32)
        assert model(torch.randn(1, 3, 48, 32)).shape == (1, 9, 48, 32)


def test_transunet_recipe_trains(transunet):
    losses = losses_of_a_few_steps(*transunet, size=32, steps=2)  # 105M parameters: two steps on a CPU
    assert losses[-1] < losses[0]


# --- FCN-8s -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fcn8s():
    """The paper's 21-class head, built once; trained with the recipe's from-scratch learning rate."""
    return recipe_model("fcn8s", "model.num_classes=21", "optim.lr=1e-2")


def test_fcn8s_parameter_count_is_the_papers_134m(fcn8s):
    # Long et al. CVPR 2015 Table 1: FCN-VGG16 "134M"; 21 PASCAL classes. The fixed bilinear upsampling kernels
    # (lr_mult 0 in voc-fcn8s/net.py) are buffers here.
    assert n_params(fcn8s[0]) == 134_362_751
    assert abs(n_params(fcn8s[0]) / 134e6 - 1) < 0.01


def test_fcn8s_scores_any_input_size_at_that_size_and_upsamples_bilinearly(fcn8s):
    from medseg.models.fcn import FixedBilinearUpsampling

    model, _ = fcn8s
    model.eval()
    with torch.no_grad():
        for size in ((64, 64), (17, 50)):
            assert model(torch.randn(1, 3, *size)).shape == (1, 21, *size)
        up = FixedBilinearUpsampling(1, 2)
        # a constant map stays constant inside (bilinear interpolation), a ramp stays a ramp
        assert torch.allclose(up(torch.ones(1, 1, 4, 4))[..., 2:-2, 2:-2], torch.ones(1, 1, 6, 6))
        ramp = up(torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4))[0, 0, 3]
        assert torch.allclose(ramp[2:-2].diff(), torch.full((5,), 0.5))
    assert not any("up" in name for name, _ in model.named_parameters())
    assert not any(name.startswith("up") for name in model.state_dict())
    assert model.card.encoder.first_conv in model.encoder.state_dict()  # where a timm vgg16 file's first conv goes


def test_fcn8s_recipe_trains(fcn8s):
    losses = losses_of_a_few_steps(*fcn8s, size=32, steps=2)
    assert losses[-1] < losses[0]


# --- ResU-Net and RU-Net (the R2U-Net paper's variants, FocusNet Table 1) ---------------------------------------

@pytest.fixture(scope="module")
def r2u_variants():
    """{name: (network, recipe)} for resunet and runet with their recipes, 3 input channels."""
    return {name: recipe_model(name, "model.in_channels=3") for name in ("resunet", "runet")}


def test_resunet_and_runet_have_r2unets_parameter_count(r2u_variants):
    # R2U-Net paper (Alom et al. 2018, abstract): the variants have "the same number of network parameters";
    # R2U-Net in this skeleton is STS-Net Table 1's 39.09M (39,091,393, tests/test_unet_variants.py).
    for name, (model, _) in r2u_variants.items():
        assert n_params(model) == 39_091_393, name


def test_resunet_and_runet_units_differ_from_r2unet_only_by_recurrence_and_residual(r2u_variants):
    from medseg.models.blocks import DoubleConv
    from medseg.models.unet_variants import RecurrentConv

    torch.manual_seed(0)
    r2unet = medseg.create_model("r2unet", 3, 1).eval()
    runet, resunet = r2u_variants["runet"][0].eval(), r2u_variants["resunet"][0].eval()
    runet.load_state_dict(r2unet.state_dict())  # same tensors, same names
    unit, plain = r2unet.encoder[1], runet.encoder[1]
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        assert torch.allclose(unit(x), unit.project(x) + plain(x), atol=1e-5)  # RU-Net = R2U-Net minus the identity
        residual = resunet.encoder[1]
        assert isinstance(residual.body, DoubleConv)
        assert not any(isinstance(m, RecurrentConv) for m in resunet.modules())
        assert torch.allclose(residual(x), residual.project(x) + residual.body(residual.project(x)), atol=1e-6)
        for model in (runet, resunet):
            assert model(torch.randn(1, 3, 32, 48)).shape == (1, 1, 32, 48)


@pytest.mark.parametrize("name", ["resunet", "runet"])
def test_resunet_and_runet_recipes_train(r2u_variants, name):
    losses = losses_of_a_few_steps(*r2u_variants[name], size=32, steps=2)
    assert losses[-1] < losses[0]


# --- GCT and SRM as STS-Net attention options (STS-Net Table 9) -------------------------------------------------

RESNEXT50_STAGE_CHANNELS = 64 + 256 + 512 + 1024 + 2048
DEEPLABV3_RESNEXT50 = 39_105_858  # tests/test_stsnet.py: STS-Net without its 5 x 3 ESCA weights


@pytest.fixture(scope="module")
def stsnet_attentions():
    """{attention: (network, recipe)}: the STS-Net recipe with GCT and with SRM in place of ESCA."""
    return {kind: recipe_model("stsnet", f"model.attention={kind}") for kind in ("gct", "srm")}


def test_gct_and_srm_add_their_papers_parameters_at_the_five_stages(stsnet_attentions):
    # GCT (Yang et al. CVPR 2020): alpha, gamma, beta = 3C per module. SRM (Lee et al. ICCV 2019): the channel-wise
    # FC's 2C + BatchNorm's 2C affine parameters (its running statistics are buffers). The default (ESCA) network
    # keeps its 39,105,873 (tests/test_stsnet.py).
    assert n_params(stsnet_attentions["gct"][0]) == DEEPLABV3_RESNEXT50 + 3 * RESNEXT50_STAGE_CHANNELS
    assert n_params(stsnet_attentions["srm"][0]) == DEEPLABV3_RESNEXT50 + 4 * RESNEXT50_STAGE_CHANNELS


def test_gct_follows_its_equations_and_starts_as_the_identity():
    from medseg.models.stsnet import GCT

    torch.manual_seed(0)
    gct = GCT(6)
    x = torch.randn(2, 6, 5, 4)
    assert torch.allclose(gct(x), x)  # gamma = beta = 0: gate 1 + tanh(0) = 1
    for parameter in (gct.alpha, gct.gamma, gct.beta):
        torch.nn.init.normal_(parameter)
    s = gct.alpha * (x.pow(2).sum(dim=(2, 3), keepdim=True) + 1e-5).sqrt()  # Eq. 1
    s_hat = 6 ** 0.5 * s / (s.pow(2).sum(dim=1, keepdim=True) + 6 * 1e-5).sqrt()  # Eq. 2: sqrt(C) s_c / ||s||_2
    assert torch.allclose(gct(x), x * (1 + torch.tanh(gct.gamma * s_hat + gct.beta)), atol=1e-6)  # Eq. 3


def test_srm_pools_style_and_gates_by_a_channelwise_fc():
    from medseg.models.stsnet import SRM

    torch.manual_seed(0)
    srm = SRM(3).eval()
    x = torch.randn(2, 3, 4, 5)
    assert torch.allclose(srm(x), x * 0.5)  # a zero CFC: sigmoid(0) everywhere
    torch.nn.init.normal_(srm.cfc)
    mean, std = x.mean(dim=(2, 3)), (x.var(dim=(2, 3)) + 1e-5).sqrt()
    z = srm.cfc[:, 0] * mean + srm.cfc[:, 1] * std
    z = z / (1 + 1e-5) ** 0.5  # BatchNorm at its initial running statistics (mean 0, var 1) and affine (1, 0)
    assert torch.allclose(srm(x), x * torch.sigmoid(z)[..., None, None], atol=1e-6)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        srm.train()(x[:1])


@pytest.mark.parametrize("attention", ["gct", "srm"])
def test_stsnet_recipe_trains_with_gct_and_srm(stsnet_attentions, attention):
    losses = losses_of_a_few_steps(*stsnet_attentions[attention], size=32, steps=4)
    assert losses[-1] < losses[0]


# --- UNet++ and DeepLabV3 at STS-Net Table 1's sizes -------------------------------------------------------------

@pytest.fixture(scope="module")
def stsnet_table1():
    """{name: (network, recipe)} for the Table 1 baselines built at its sizes, with their recipes."""
    return {name: recipe_model(name) for name in ("unetpp_stsnet", "deeplabv3_stsnet")}


@pytest.mark.parametrize("name,expected,table", [("unetpp_stsnet", 36_629_698, 36.62e6),
                                                 ("deeplabv3_stsnet", 18_876_972, 18.85e6)])
def test_stsnet_table1_baselines_match_its_parameter_counts(stsnet_table1, name, expected, table):
    # STS-Net (Scientific Reports 2025) Table 1 "Params(M)": UNet++ 36.62, DeepLabV3 18.85 (3 in, 2 classes).
    model = stsnet_table1[name][0].eval()
    assert n_params(model) == expected and abs(expected / table - 1) < 0.01
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_unetpp_stsnet_upsamples_bilinearly_into_wider_nodes(stsnet_table1):
    model = stsnet_table1["unetpp_stsnet"][0]
    assert isinstance(model.up["x01"], torch.nn.Upsample) and not list(model.up.parameters())
    assert model.blocks["x03"][0][0].in_channels == 3 * 64 + 128  # three skips of X_{0,k} and the up-sampled X_{1,2}
    assert list(model.heads) == ["y4"] and not model.gates


@pytest.mark.parametrize("name", ["unetpp_stsnet", "deeplabv3_stsnet"])
def test_stsnet_table1_baseline_recipes_train(stsnet_table1, name):
    losses = losses_of_a_few_steps(*stsnet_table1[name], size=32, steps=2)
    assert losses[-1] < losses[0]
