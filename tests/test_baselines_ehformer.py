"""EH-Former (Information Fusion 2024), a baseline of STS-Net's Table 1: the parameter count pinned to the authors'
code, forward shapes at a small size, its parts (DropKey attention, uncertainty map, D-Fusion's alpha by epoch, the
stage-1 to stage-2 hand-over) and a short CPU training check of the second stage with its streams' losses."""

from types import SimpleNamespace

import pytest
import torch
from tests.baseline_training import n_params, toy_batch

import medseg
from medseg.config import load_recipe
from medseg.engine.module import SegmentationModule
from medseg.engine.optim import build_optimizer
from medseg.errors import MedsegError
from medseg.losses import build_loss
from medseg.models import save_model
from medseg.models.ehformer import dropkey_attention, mit_b5, uncertainty_map
from medseg.models.pretrained import load_network_weights

# Counted on the authors' code (lele0109/EH-Former model/my_net.py): Fine_SegRes_EnFuse_SACAV3_Independent() has
# 270,629,396 parameters: its frozen stage-1 network Coarse_SegRes 86,371,345, two streams of 86,371,345 each,
# fuse1..fuse4 45,956 + 273,220 + 1,612,036 + 4,655,812 and up4..up1 + out_conv1 4,928,337. STS-Net Table 1's
# "86.37M" is one of the three MiT-B5 networks (mit_b5 81,443,008 + its decoder 4,928,337), not EH-Former.
REFERENCE, ONE_BRANCH, FUSION, DECODER = 270_629_396, 86_371_345, 6_587_024, 4_928_337


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return medseg.create_model("ehformer", 3, 1)


def test_ehformer_parameter_count_matches_the_reference_code(network):
    assert n_params(network) == REFERENCE == 3 * ONE_BRANCH + FUSION + DECODER
    assert n_params(network.coarse) == n_params(network.easy) == ONE_BRANCH
    assert n_params(network.fusion) == FUSION and n_params(network.decoder) + n_params(network.easy.decoder) == (
        2 * DECODER)
    assert n_params(network.coarse.encoder) == 81_443_008
    assert round(ONE_BRANCH / 1e6, 2) == 86.37  # STS-Net Table 1
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    assert trainable == REFERENCE - ONE_BRANCH  # stage 2: the stage-1 network is frozen


def test_ehformer_stage_one_trains_only_its_uncertainty_network():
    stage1 = medseg.create_model("ehformer", 1, 1, stage=1)
    assert {name.split(".")[0] for name in stage1.state_dict()} == {"coarse", "alpha"}  # the stage-2 parts unbuilt
    assert n_params(stage1) == ONE_BRANCH - 2 * 64 * 7 * 7  # 1 input channel: the 7x7 patch embedding has 2 fewer
    assert all(p.requires_grad for p in stage1.parameters())
    with pytest.raises(MedsegError, match="binary only"):
        medseg.create_model("ehformer", 3, 2)
    with pytest.raises(MedsegError, match="stage must be 1"):
        medseg.create_model("ehformer", 3, 1, stage=3)


def test_ehformer_forward_shapes_and_streams_in_training(network):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert network.eval()(x).shape == (2, 1, 64, 96)
        assert network.extra_losses(torch.zeros(2, 64, 96)) == {}  # nothing from an evaluation forward
        assert network.train()(x).shape == (2, 1, 64, 96)
    assert not network.coarse.training and network.easy.training  # the frozen stage-1 BatchNorm stays in eval
    losses = network.extra_losses(torch.ones(2, 64, 96, dtype=torch.long))
    assert sorted(losses) == ["easy_stream", "hard_stream"] and all(torch.isfinite(v) for v in losses.values())
    assert network.extra_losses(torch.ones(2, 64, 96)) == {}  # taken once
    with pytest.raises(ValueError, match="multiples of 32"):
        network(torch.randn(1, 3, 48, 64))


def test_dropkey_attention_is_segformer_attention_and_drops_whole_query_rows():
    torch.manual_seed(0)
    block = mit_b5(3).block1[0]  # the 1/4 stage: reduction ratio 8
    tokens, height, width = torch.randn(2, 16 * 16, 64), 16, 16
    grid = tokens.transpose(1, 2).reshape(2, 64, height, width)
    with torch.no_grad():
        plain = dropkey_attention(block.attn, tokens, height, width, None)
        assert torch.allclose(plain, block.attn(tokens, height, width), atol=1e-6)  # smp's own forward
        assert torch.equal(dropkey_attention(block.attn, tokens, height, width, torch.zeros(2, 256, 1)), plain)
        dropped = dropkey_attention(block.attn, tokens, height, width, torch.ones(2, 256, 1))
        context = block.attn.norm(block.attn.sr(grid).flatten(2).transpose(1, 2))
        values = block.attn.kv(context)[..., 64:]  # one head: the second half of kv
        uniform = block.attn.proj(values.mean(dim=1, keepdim=True)).expand(-1, 256, -1)
        assert torch.allclose(dropped, uniform, atol=1e-5)


def test_uncertainty_map_is_normalised_variance_plus_entropy():
    agree = torch.full((6, 1, 1, 2, 2), 0.5)
    agree[:, :, :, 0, 0] = torch.tensor([0.1, 0.9, 0.1, 0.9, 0.1, 0.9]).view(6, 1, 1)  # one disputed pixel
    u = uncertainty_map(agree)
    assert u.shape == (1, 1, 2, 2) and u.max() <= 1 and u.min() >= 0
    entropy = lambda p: -p * torch.log(torch.tensor(p + 1e-9))  # noqa: E731
    disputed, certain = float(entropy(0.1) + entropy(0.9)) / 2, float(entropy(0.5))
    assert torch.isclose(u[0, 0, 0, 0], torch.tensor((1 + disputed / certain) / 2))
    assert torch.isclose(u[0, 0, 1, 1], torch.tensor(0.5))  # no variance, the largest entropy


def test_fusion_alpha_follows_the_epoch_and_is_saved():
    module = SegmentationModule(load_recipe("ehformer").to_dict())
    module.trainer = SimpleNamespace(current_epoch=25)  # what the hook reads of Lightning's trainer
    module.on_train_epoch_start()
    network = module.model
    assert float(network.alpha) == 0.75 and float(network.state_dict()["alpha"]) == 0.75  # 1 - 0.5 * 25 / 50
    network.set_training_progress(0, 50)
    assert float(network.alpha) == 1.0


def test_stage_two_starts_from_a_stage_one_file(network, tmp_path):
    torch.manual_seed(1)
    stage1 = medseg.create_model("ehformer", 3, 1, stage=1)
    path = save_model(stage1, tmp_path / "stage1") / "model.safetensors"
    stage2 = medseg.create_model("ehformer", 3, 1)
    report = load_network_weights(stage2, path)
    assert report.loaded == len(stage1.state_dict()) and not report.unused
    later = [name for name in stage2.state_dict() if name.split(".")[0] in ("easy", "hard", "fusion", "decoder")]
    assert sorted(report.reinitialised) == sorted(later)  # the stage-2 parts keep their init, reported
    counts = {part: sum(name.startswith(part + ".") for name in later) for part in ("easy", "hard")}
    assert f"{len(later)} re-initialised: {counts['easy']} under easy, {counts['hard']} under hard" in report.summary()
    assert torch.equal(stage2.coarse.encoder.block3[7].attn.q.weight, stage1.coarse.encoder.block3[7].attn.q.weight)
    assert not any(p.requires_grad for p in stage2.coarse.parameters())


def test_ehformer_second_stage_recipe_trains_on_cpu(network):
    recipe = load_recipe("ehformer")
    criterion = build_loss(recipe.to_dict()["loss"], None)
    optimizer = build_optimizer(network, recipe.optim)
    images, truth = toy_batch(32)  # the smallest input (one token at 1/32): the check is about the wiring
    torch.manual_seed(0)
    network.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss, _ = criterion(network(images), truth)
        extras = network.extra_losses(truth)
        loss = loss + sum(recipe.train.extra_loss_weights[k] * v for k, v in extras.items())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    assert all(p.grad is None for p in network.coarse.parameters())
