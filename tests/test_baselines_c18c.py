"""More baselines of M2SNet's tables (seed 001, Tables 3-4): BCS-Net, NU-Net, SK-U-Net. Parameter counts pinned to
their reference code, forward shapes at a small size, and a short CPU training check per network."""

import pytest
import timm
import torch
from tests.baseline_training import check_edge_extra_loss, n_params, recipe_training_losses, toy_batch, training_losses

import medseg
from medseg.config import load_recipe
from medseg.errors import MedsegError
from medseg.losses import build_loss

# BCS-Net: rmcong/BCS-Net-TIM22 (BCS-NET.zip, module/network.py), BCS_Net() has 48,644,127 parameters, including the
# Res2Net classifier (2048 * 1000 + 1000) and three AttentionFusion modules (1,772,544) that its forward never calls.
# Loaded into bcsnet by name, the reference weights give equal outputs (checked when the network was built).
BCSNET_REFERENCE, RES2NET_FC, UNUSED_FUSION = 48_644_127, 2048 * 1000 + 1000, 1_772_544


def test_bcsnet_parameter_count_is_the_reference_code_less_its_unused_modules():
    model = medseg.create_model("bcsnet", 3, 1)
    assert n_params(model) == BCSNET_REFERENCE - RES2NET_FC - UNUSED_FUSION == 44_822_583
    assert n_params(model.encoder) == 23_669_352  # Res2Net-50-v1b without its classifier


def test_bcsnet_four_supervised_maps_in_training_and_one_in_eval(tmp_path):
    from medseg.models.bcsnet import GlobalContext

    model = medseg.create_model("bcsnet", 3, 1)
    x = torch.randn(2, 3, 64, 96)
    outputs = model.train()(x)
    assert isinstance(outputs, list) and [o.shape for o in outputs] == [(2, 1, 64, 96)] * 4
    with torch.no_grad():
        assert model.eval()(x[:1]).shape == (1, 1, 64, 96)
    features = torch.randn(1, 16, 4, 4)
    assert torch.equal(GlobalContext(16).eval()(features), features)  # delta starts at 0: the identity
    with pytest.raises(MedsegError, match="binary only"):
        medseg.create_model("bcsnet", 3, 2)
    backbone = timm.create_model("res2net50d", pretrained=False)
    torch.save(backbone.state_dict(), tmp_path / "res2net50d.pth")
    loaded = medseg.create_model("bcsnet", 1, 1, encoder_weights=str(tmp_path / "res2net50d.pth"))
    assert torch.equal(loaded.encoder.layer1[0].conv1.weight, backbone.layer1[0].conv1.weight)
    assert loaded.encoder.conv1[0].weight.shape[1] == 1


def test_bcsnet_boundary_map_is_trained_against_the_masks_edges():
    model = medseg.create_model("bcsnet", 3, 1)
    # the boundary unit's logits, upsampled x4 as the code's boundary_map; the decoder comes after the boundary unit
    check_edge_extra_loss(model, model.boundary, unreached=model.level2.convs[-1][0].weight)


def test_bcsnet_recipe_trains_on_cpu():
    recipe = load_recipe("bcsnet")
    assert recipe.train.deep_supervision_weights == [1.0] * 4 and recipe.train.extra_loss_weights == {"edge": 1.0}
    losses = recipe_training_losses("bcsnet", size=32, steps=2)
    assert losses[-1] < losses[0]


# NU-Net: CGPxy/NU-net model_net.py `deep_unet7` (Keras); its trainable weights (Conv2D kernels and biases, BN gamma and
# beta) come to 77,052,833, the 51 ConvBlocks + three 32-channel shortcuts + the 1x1 head counted layer by layer.
def _keras_conv_block(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out + c_out + 2 * c_out + 9 * c_out * c_out + c_out + 2 * c_out


def test_nunet_parameter_count_matches_the_keras_layers():
    blocks = [(3, 64), (64, 128), (160, 128), (128, 256), (288, 256), (256, 512), (544, 512), (512, 1024)]  # Conv1-8
    blocks += [(64, 64)] * 6 + [(128, 128)] * 5 + [(128, 128)] * 4 + [(256, 256)] * 3 + [(256, 256)] * 2 + [(512, 512)]
    blocks += [(256, 256)] * 3 + [(128, 128)] * 7 + [(64, 64)] * 5  # updata2 .. updata10
    blocks += [(2880, 512), (1536, 512), (1024, 256), (768, 256), (512, 128), (384, 128), (256, 64)]  # up1 .. up7
    shortcuts = sum(9 * c * 32 + 32 + 2 * 32 for c in (64, 128, 256))
    keras_total = sum(_keras_conv_block(i, o) for i, o in blocks) + shortcuts + 64 + 1
    assert n_params(medseg.create_model("nunet", 3, 1)) == keras_total == 77_052_833


def test_nunet_forward_and_recipe_training_on_cpu():
    model = medseg.create_model("nunet", 3, 2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 256)).shape == (1, 2, 128, 256)
    with pytest.raises(ValueError, match="multiples of 128"):
        model(torch.randn(1, 3, 64, 128))
    losses = recipe_training_losses("nunet", size=128, steps=2)
    assert losses[-1] < losses[0]


# SK-U-Net: mbyr/bus_seg seg_lib.py `selective_unet()`, defaults (filters 16, compression 0.5, one gray channel);
# its Keras trainable weights counted layer by layer: 3,934,977.
def _keras_selective_layer(c_in: int, c_out: int) -> int:
    hidden = c_out // 2
    convs = 2 * (9 * c_in * c_out + c_out + 2 * c_out)  # dilated and plain 3x3 conv + BN
    return convs + c_out * hidden + hidden + 2 * hidden + hidden * c_out + c_out  # Dense, BN, Dense


def test_skunet_parameter_count_matches_the_keras_layers():
    widths, inputs = [16, 32, 64, 128, 256], [1, 16, 32, 64, 128]
    total = sum(_keras_selective_layer(i, w) + _keras_selective_layer(w, w) for i, w in zip(inputs, widths))
    rising = widths[::-1]
    total += sum(4 * i * o + o + _keras_selective_layer(2 * o, o) + _keras_selective_layer(o, o)
                 for i, o in zip(rising, rising[1:]))
    total += 16 + 1  # the 1x1 sigmoid head
    assert n_params(medseg.create_model("skunet", 1, 1)) == total == 3_934_977


def test_skunet_selects_between_its_two_receptive_fields_and_trains_on_cpu():
    from medseg.models.skunet import SelectiveKernel

    unit = SelectiveKernel(3, 4).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        dilated, plain, mixed = unit.dilated(x), unit.plain(x), unit(x)
    low, high = torch.minimum(dilated, plain), torch.maximum(dilated, plain)
    assert torch.all(mixed >= low - 1e-6) and torch.all(mixed <= high + 1e-6)  # a convex mix of the two branches
    model = medseg.create_model("skunet", 1, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 96)).shape == (1, 1, 64, 96)
    recipe = load_recipe("skunet")
    assert recipe.model.in_channels == 1 and recipe.data.size in (224, (224, 224))
    torch.manual_seed(0)
    model = medseg.create_model("skunet", 3, 1).train()
    criterion = build_loss(recipe.to_dict()["loss"])
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.optim.lr)
    losses = training_losses(model, criterion, optimizer, *toy_batch(64), steps=3)
    assert losses[-1] < losses[0]
