"""FocusNet (ISBI 2019, as the authors' Keras code builds it): parameter counts, blocks, the three gates,
gradient into branch A, the Keras L2, channel shifts and the plateau schedule of its recipe."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from medseg.config import load_recipe
from medseg.data.transforms import RandomChannelShift
from medseg.engine.optim import build_optimizer, build_scheduler, conv_kernel_l2, l2_kernels
from medseg.models import create_model
from medseg.models.focusnet import FocusGate, KerasUpConv, PreActBlock, SqueezeExcitation


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_pinned():
    assert count(create_model("focusnet", 3, 1)) == 18_933_497  # ours: the paper reports no count
    assert count(create_model("focusnet", 3, 1, stem_width=24)) == 18_925_569  # the earlier code's stem
    assert count(create_model("focusnet", 1, 1)) == 18_933_497 - 2 * (7 * 7 * 64 + 3 * 3 * 32)  # gray input


def test_output_shape_and_size_check():
    model = create_model("focusnet", 1, 1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 96)).shape == (2, 1, 64, 96)
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.randn(1, 1, 40, 40))


def test_the_three_gates_get_branch_a_features_of_their_channel_counts():
    model = create_model("focusnet", 3, 1).eval()
    seen = []
    for gate in (m for m in model.modules() if isinstance(m, FocusGate)):
        gate.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].shape, inputs[1].shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert seen == [((1, 64, 64, 64),) * 2, ((1, 128, 32, 32),) * 2, ((1, 256, 16, 16),) * 2]


def test_the_segmentation_loss_trains_branch_a():
    torch.manual_seed(0)
    model = create_model("focusnet", 3, 1)
    logits = model(torch.randn(2, 3, 32, 32))
    F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)).backward()
    branch_a = model.attention
    assert branch_a.stem[0].weight.grad.abs().sum() > 0  # the first layer of branch A
    assert branch_a.decoder[0].block.conv2.weight.grad.abs().sum() > 0  # a5, the deepest gate's source


def test_branch_a_changes_the_output():
    torch.manual_seed(0)
    model = create_model("focusnet", 3, 1).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model.attention.decoder[2].block.conv2.bias.add_(5.0)  # a7: gates the first level
        after = model(x)
    assert not torch.allclose(before, after)


def test_preact_block_is_full_preactivation_without_activation_after_the_sum():
    torch.manual_seed(0)
    block = PreActBlock(8, 8).eval()
    x = torch.randn(2, 8, 10, 10)
    inner = block.conv2(block.mid(block.conv1(F.relu(block.pre[0](x)))))
    assert torch.allclose(block(x), inner + x, atol=1e-6)  # identity shortcut, nothing after the add
    assert (block(x) < 0).any()
    first = PreActBlock(3, 8, first=True)
    assert isinstance(first.pre, torch.nn.Identity) and first.shortcut.bias is not None  # 1x1 conv, bias, no BN
    strided = PreActBlock(8, 16, stride=2)
    assert strided(x).shape == (2, 16, 5, 5)
    assert first.mid[0].eps == 1e-3 and first.mid[0].momentum == 0.01  # Keras BatchNorm defaults


def test_squeeze_excitation_formula():
    torch.manual_seed(0)
    se = SqueezeExcitation(32)
    x = torch.randn(2, 32, 6, 6)
    w1, w2 = se.excite[0].weight, se.excite[2].weight  # (2, 32), (32, 2): ratio 16, no biases
    weights = torch.sigmoid(F.relu(x.mean(dim=(2, 3)) @ w1.T) @ w2.T)
    assert w1.shape == (2, 32) and se.excite[0].bias is None
    assert torch.allclose(se(x), x * weights[:, :, None, None], atol=1e-6)


def test_keras_upconv_pads_right_and_bottom():
    torch.manual_seed(0)
    up = KerasUpConv(4, 3)
    x = torch.randn(1, 4, 5, 5)
    conv = up[2]
    expected = F.relu(F.conv2d(F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (0, 1, 0, 1)),
                               conv.weight, conv.bias))
    assert torch.allclose(up(x), expected, atol=1e-6) and expected.shape == (1, 3, 10, 10)


def test_keras_he_normal_initialisation():
    torch.manual_seed(0)
    conv = create_model("focusnet", 3, 1).encoder[3].block.conv1  # 3x3, 256 -> 512: fan_in 2304
    std = math.sqrt(2 / (256 * 9))
    assert conv.weight.std().item() == pytest.approx(std, rel=0.02)
    assert conv.weight.abs().max() <= 2 * std / 0.8796 + 1e-6 and torch.all(conv.bias == 0)


def test_dropout_placement():
    single = create_model("focusnet", 3, 1)
    everywhere = create_model("focusnet", 3, 1, dropout_everywhere=True)
    assert sum(isinstance(m, torch.nn.Dropout) for m in single.modules()) == 1
    # after each block of both encoders: 6 in branch A (the bottom one included), 2 per branch-B level
    assert sum(isinstance(m, torch.nn.Dropout) for m in everywhere.modules()) == 6 + 8
    assert count(everywhere) == count(single)


def test_kernel_l2_is_added_to_the_training_loss():
    from medseg.engine.module import SegmentationModule

    recipe = load_recipe("focusnet", ["optim.kernel_l2=0.5", "model.in_channels=1"])
    module = SegmentationModule(recipe.to_dict())
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # log_dict logs through log
    batch = {"image": torch.randn(2, 1, 32, 32), "mask": torch.randint(0, 2, (2, 32, 32))}
    torch.manual_seed(1)
    total = module.training_step(batch, 0)
    assert set(logged) == {"train/loss", "train/dice", "train/kernel_l2"}
    torch.manual_seed(1)
    base, _ = module.criterion(module.model(batch["image"]), batch["mask"])
    model = module.model
    ups = [m[2].weight for m in model.modules() if isinstance(m, KerasUpConv)]
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(ups) == 7 and len(convs) == 78  # 23 pre-act blocks (46 convs, 22 shortcuts), 2 stems, head
    # every conv kernel but the 7 up-convs and the head; the attention stem counts 5x (Keras l2(5e-4))
    kernels = sum(w.pow(2).sum() for w in convs) - sum(w.pow(2).sum() for w in ups) - model.head.weight.pow(2).sum()
    kernels = kernels + 4 * model.attention.stem[0].weight.pow(2).sum()
    assert torch.allclose(conv_kernel_l2(l2_kernels(model)), kernels)
    assert torch.allclose(total, base + 0.5 * kernels, rtol=1e-5)
    unet = create_model("unet", 3, 1, base_channels=4)  # a network without a list: every conv kernel
    assert torch.allclose(conv_kernel_l2(l2_kernels(unet)), sum(m.weight.pow(2).sum() for m in unet.modules()
                                                    if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))))


def test_channel_shift_moves_the_image_only_and_stays_in_range():
    torch.manual_seed(0)
    image = tv_tensors.Image(torch.rand(3, 16, 16) * 0.5 + 0.25)
    mask = tv_tensors.Mask(torch.randint(0, 2, (16, 16)))
    shifted, same_mask = RandomChannelShift(shift=0.1)(image, mask)
    assert torch.equal(same_mask, mask)
    difference = shifted - image
    inside = (shifted > image.min()) & (shifted < image.max())
    offset = difference[inside]
    assert offset.abs().max() <= 0.1 and torch.allclose(offset, offset[0].expand_as(offset))  # one offset (Keras)
    assert shifted.min() >= image.min() and shifted.max() <= image.max()
    per_channel, _ = RandomChannelShift(shift=0.1, per_channel=True)(image, mask)
    offsets = [(per_channel[c] - image[c])[(per_channel[c] > image.min()) & (per_channel[c] < image.max())][0]
               for c in range(3)]
    assert len({round(float(o), 6) for o in offsets}) == 3


def test_recipe_plateau_follows_keras():
    recipe = load_recipe("focusnet")
    assert (recipe.optim.lr, recipe.optim.kernel_l2, recipe.train.epochs,
            recipe.train.batch_size) == (1e-3, 1e-4, 80, 8)
    assert recipe.data.normalize == "dataset" and recipe.train.monitor == "val/loss"
    model = torch.nn.Conv2d(1, 1, 1)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.epochs, 1)["scheduler"]
    for loss in (1.0, 0.9995, 0.9995, 0.9995, 0.9995):  # improvements below min_delta 1e-3 count as none
        scheduler.step(loss)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # 4 epochs without improvement: kept
    scheduler.step(0.9995)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # halved on the 5th, as Keras' patience 5


def test_unresolved_dataset_normalisation_is_refused():
    from medseg.data.transforms import Preprocessing
    from medseg.errors import MedsegError

    with pytest.raises(MedsegError, match="no statistics were computed"):
        Preprocessing((32, 32), 3, "dataset").normalise(torch.rand(3, 32, 32))
