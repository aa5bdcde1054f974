"""Fovea-UNet (BioMedical Engineering OnLine 2023): sizes, encoder strides, the PSA mask, gradients into the
importance maps, nHSIC, and the general freeze / unfreeze trainer feature on a short real training."""

import csv
import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medseg.config import load_recipe
from medseg.engine.train import train
from medseg.errors import MedsegError
from medseg.models import create_model
from medseg.models.base import NamedFeatureLayers
from medseg.models.fovea_unet import psa_gather_index
from medseg.models.nhsic import nhsic_penalty


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_pinned():
    model = create_model("fovea_unet", 3, 1)  # the paper's layout: stem + four bottlenecks (ours, computed)
    assert count(model.encoder) == 36_048
    assert count(model.skips) == 323_444  # PSA branches on 16, 24, 40, 80 channels + the four Z convs
    assert count(model) == 5_671_813  # ours: decoder widths (512, 256, 128, 64); 21.64 MiB in float32
    timm_layout = create_model("fovea_unet", 3, 1, encoder="ghostnet")  # stem + blocks 0-6 (11 bottlenecks)
    assert count(timm_layout.encoder) == 585_548
    assert count(timm_layout.skips) == 390_768 + (8 + 12 + 20 + 56 + 4)  # PSA branches + the four Z convs
    assert count(timm_layout) == 6_436_193  # 24.55 MiB in float32
    assert count(create_model("fovea_unet", 3, 1, decoder_widths=[256, 128, 64, 32])) < 3_500_000


@pytest.mark.parametrize(("encoder", "f4", "bottlenecks"), [("ghostnet_4b", 80, [1, 1, 1, 1]),
                                                             ("ghostnet", 112, [1, 2, 2, 6])])
def test_encoder_outputs_at_half_quarter_eighth_eighth(encoder, f4, bottlenecks):
    model = create_model("fovea_unet", 3, 1, encoder=encoder).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 3, 64, 64))
        assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (f4, 8, 8)]
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 1, 64, 96)
    per_stage = [sum(type(m).__name__ == "GhostBottleneck" for m in stage.modules()) for stage in model.encoder.stages]
    assert per_stage == bottlenecks  # the paper: four bottlenecks of two Ghost modules (four H-Ghost layers) each
    assert len(model.encoder.ghost_modules()) == 2 * sum(bottlenecks)
    assert isinstance(model, NamedFeatureLayers)
    layers = model.analysis_layers()  # the intrinsic features of paper Fig. 5, in forward order
    assert len(layers) == 2 * sum(bottlenecks) and layers[:2] == ["encoder.stages.0.0.ghost1.primary_conv",
                                                                  "encoder.stages.0.0.ghost2.primary_conv"]
    assert "encoder.stages.1.0.0.ghost1.primary_conv" in layers  # the same names in both layouts
    assert all(isinstance(model.get_submodule(name)[0], torch.nn.Conv2d) for name in layers)
    with pytest.raises(MedsegError, match="encoder must be one of ghostnet_4b, ghostnet, vgg16"):
        create_model("fovea_unet", 3, 1, encoder="ghostnet_11")


def test_psa_index_reads_the_relative_offset():
    height, width = 3, 4
    index = psa_gather_index(height, width)
    for p in range(height * width):
        for q in range(height * width):
            k, col, s, t = p // width, p % width, q // width, q % width
            dy, dx = divmod(int(index[p, q]), 2 * width - 1)
            assert (dy - (height - 1), dx - (width - 1)) == (s - k, t - col)  # channel = offset of q seen from p


def test_psa_attention_is_a_distribution_over_sources():
    torch.manual_seed(0)
    model = create_model("fovea_unet", 3, 1, attention_size=8).eval()
    branch = model.skips[2].importance.collect
    branch.reduce = torch.nn.Identity()  # aggregate a constant map: a softmax-weighted mean leaves it 1
    with torch.no_grad():
        out = branch(torch.ones(2, 10, 8, 8))
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_segmentation_loss_reaches_every_importance_map():
    torch.manual_seed(0)
    model = create_model("fovea_unet", 3, 1, nhsic=False)
    logits = model(torch.randn(2, 3, 128, 128))  # every stage wide enough for R > 1 (F2: floor(32 / 16) = 2)
    F.binary_cross_entropy_with_logits(logits, (torch.rand_like(logits) > 0.5).float()).backward()
    for skip in model.skips:
        assert skip.importance.score.weight.grad.abs().sum() > 0
        assert skip.importance.collect.mask_head[1].weight.grad.abs().sum() > 0
    hard = create_model("fovea_unet", 3, 1, hard=True, nhsic=False)
    F.binary_cross_entropy_with_logits(hard(torch.randn(2, 3, 128, 128)), torch.ones(2, 1, 128, 128)).backward()
    assert all(s.importance.score.weight.grad is None for s in hard.skips)  # floor(): the ablation Z cannot learn


@pytest.mark.parametrize("pooling", ["avg", "mixed", "lp"])
def test_every_pooling_mode_builds_and_runs(pooling):
    model = create_model("fovea_unet", 3, 1, pooling=pooling, hard=pooling == "avg", nhsic=False,
                         boundaries=[0.25, 0.125, 0.25, 0.25])
    logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 1, 64, 64) and torch.isfinite(logits).all()
    assert [skip.last_importance is not None for skip in model.skips] == [True] * 4  # R > 1 everywhere


def test_identity_pooling_is_the_plain_skip():
    model = create_model("fovea_unet", 3, 1, pooling="identity").eval()
    x = torch.randn(1, 16, 32, 32)
    assert torch.equal(model.skips[0](x), x)
    small = create_model("fovea_unet", 3, 1).eval().skips[1]  # s = 1/16 on a 15-wide map: R = 1
    y = torch.randn(1, 24, 15, 15)
    assert torch.equal(small(y), y) and small.last_importance is None  # no attention computed for nothing
    with pytest.raises(MedsegError, match="pooling"):
        create_model("fovea_unet", 3, 1, pooling="max")


@pytest.mark.parametrize("encoder", ["vgg16", "resnet50", "mobilenet_v2"])
def test_backbone_swaps_keep_the_stage_layout(encoder):
    model = create_model("fovea_unet", 3, 1, encoder=encoder, nhsic=False).eval()
    with torch.no_grad():
        features = model.encoder(torch.randn(1, 3, 64, 64))
        assert [f.shape[-1] for f in features] == [32, 16, 8, 8]  # 1/2, 1/4, 1/8, 1/8 as H-GhostNet
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert model.extra_losses(None) == {} and model.analysis_layers() == []  # no Ghost modules: `--layer` needed
    with pytest.raises(MedsegError, match="nhsic: false"):
        create_model("fovea_unet", 3, 1, encoder=encoder)


def _nhsic_by_the_equation(features: torch.Tensor, eps: float = 1e-3) -> float:
    """Paper Eq. 11-13 written out: samples = the images, I_i = channel i's flattened map, Gaussian kernel with
    the median pairwise squared distance as sigma^2, K~ = K_bar (K_bar + eps s I)^-1, mean of tr(K~_i K~_j)."""
    x = features.double()
    s, m = x.shape[:2]
    centring = torch.eye(s, dtype=torch.float64) - torch.ones(s, s, dtype=torch.float64) / s
    tildes = []
    for i in range(m):
        rows = x[:, i].reshape(s, -1)
        squared = torch.tensor([[float(((rows[a] - rows[b]) ** 2).sum()) for b in range(s)] for a in range(s)],
                               dtype=torch.float64)
        sigma2 = squared[~torch.eye(s, dtype=torch.bool)].median()
        bar = centring @ torch.exp(-squared / (2 * sigma2)) @ centring
        tildes.append(bar @ torch.linalg.inv(bar + eps * s * torch.eye(s, dtype=torch.float64)))
    pairs = [float(torch.trace(tildes[i] @ tildes[j])) for i in range(m) for j in range(m) if i != j]
    return sum(pairs) / len(pairs)


def test_nhsic_is_the_papers_equation_over_the_batch_images():
    torch.manual_seed(0)
    features = torch.randn(5, 3, 2, 3)  # s = 5 images, m = 3 channels of p = 6 neurons
    features[:, 2] = features[:, 0].tanh() + 0.1 * features[:, 2]  # one dependent pair
    assert float(nhsic_penalty(features)) == pytest.approx(_nhsic_by_the_equation(features), rel=1e-6)
    assert float(nhsic_penalty(features, eps=0.05)) == pytest.approx(_nhsic_by_the_equation(features, 0.05), rel=1e-6)
    # two images by hand: sigma^2 = d^2, k = exp(-1/2), K_bar = (1 - k) P with P the centring projector, so
    # K~ = (1 - k) / (1 - k + 2 eps) P for any non-constant channel and nHSIC = ((1 - k) / (1 - k + 2 eps))^2
    k, eps = math.exp(-0.5), 1e-3
    two = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert float(nhsic_penalty(two, eps=eps)) == pytest.approx(((1 - k) / (1 - k + 2 * eps)) ** 2, rel=1e-9)
    assert nhsic_penalty(torch.randn(1, 4, 3, 3)) == 0  # one image: no sample pairs
    dead = two.clone()
    dead[:, 1:] = 1.0  # channels constant over the images carry no kernel: their pairs add 0
    assert float(nhsic_penalty(dead)) == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(nhsic_penalty(torch.randn(3, 100, 4, 4), max_channels=8))


def test_nhsic_separates_dependence_only_with_many_samples():
    torch.manual_seed(0)
    scalar = torch.randn(256, 1, 1, 1)  # 256 images of a 1 x 1 map: one neuron per sample
    independent = nhsic_penalty(torch.cat([scalar, torch.randn_like(scalar)], dim=1))
    dependent = nhsic_penalty(torch.cat([scalar, scalar.tanh()], dim=1))
    identical = nhsic_penalty(torch.cat([scalar, scalar], dim=1))
    assert independent < 0.5 < 2.0 < dependent < identical  # identical is the maximum (Cauchy-Schwarz)
    # the paper's batch of 4 images of 32 x 32 maps: K~ is nearly the centring projector, nHSIC near s - 1 = 3
    # whatever the channels (measured 2.94 both ways), so it hardly tells dependent from independent channels
    maps = torch.randn(4, 1, 32, 32)
    small_independent = nhsic_penalty(torch.cat([maps, torch.randn_like(maps)], dim=1))
    small_identical = nhsic_penalty(torch.cat([maps, maps], dim=1))
    assert 2.9 < small_independent <= small_identical + 1e-6 < 3 and small_identical - small_independent < 0.01
    # the cells reading (an option): 4 x 4 pooled cells of every image as samples separate them at batch 4
    cells_independent = nhsic_penalty(torch.cat([maps, torch.randn_like(maps)], dim=1), samples="cells")
    cells_identical = nhsic_penalty(torch.cat([maps, maps], dim=1), samples="cells")
    assert cells_independent < 1.5 and cells_identical > 4 * cells_independent


def test_the_nhsic_samples_option_reaches_the_penalty():
    x = torch.randn(2, 3, 64, 64)
    penalties = {}
    for samples in ("images", "cells"):
        torch.manual_seed(0)
        model = create_model("fovea_unet", 3, 1, decoder_widths=(16, 16, 8, 8), nhsic_samples=samples).train()
        model(x)
        penalties[samples] = model.extra_losses(None)["nhsic"].item()
    assert penalties["images"] != pytest.approx(penalties["cells"])
    with pytest.raises(MedsegError, match="nhsic_samples must be one of images, cells, got 'pixels'"):
        create_model("fovea_unet", 3, 1, nhsic_samples="pixels")


def test_nhsic_is_an_extra_loss_of_training_forwards_only():
    torch.manual_seed(0)
    model = create_model("fovea_unet", 3, 1)
    model(torch.randn(4, 3, 64, 64))
    loss = model.extra_losses(None)["nhsic"]
    assert loss > 0 and loss.requires_grad
    loss.backward()
    assert model.encoder.stem[0].weight.grad.abs().sum() > 0  # nHSIC trains the encoder
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert model.extra_losses(None)["nhsic"] == 0
    assert create_model("fovea_unet", 3, 1, nhsic=False).extra_losses(None) == {}


class Snapshots(L.Callback):
    """Encoder weights and BatchNorm statistics at the start and after every training epoch."""

    def __init__(self):
        self.states = []

    def _take(self, module):
        self.states.append({k: v.detach().clone() for k, v in module.model.encoder.state_dict().items()})

    def on_train_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._take(pl_module)


def test_the_recipe_trains_at_1e_4_frozen_for_30_epochs_then_at_1e_5_to_epoch_300():
    """Paper, Experiment settings: the backbone frozen for the first 30 of 300 epochs at lr 1e-4, then the whole
    network at 1e-5: the recipe's schedule and freeze callback, epoch by epoch, as Lightning calls them."""
    from medseg.engine.callbacks import FreezeGroups
    from medseg.engine.module import SegmentationModule
    from medseg.engine.optim import build_optimizer, build_scheduler

    recipe = load_recipe("fovea_unet", ["model.decoder_widths=[16,16,8,8]"])
    assert recipe.train.epochs == 300 and recipe.train.freeze.groups == ["encoder"]
    module = SegmentationModule(recipe.to_dict())
    optimizer = build_optimizer(module.model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.train.epochs, 1)
    assert scheduler["interval"] == "epoch"
    freeze = FreezeGroups(recipe.train.freeze.groups, recipe.train.freeze.epochs)
    freeze.freeze_before_training(module)
    encoder = list(module.model.encoder.parameters())
    lrs, frozen = [], []
    for epoch in range(recipe.train.epochs):
        freeze.finetune_function(module, epoch, optimizer)
        lrs.append(optimizer.param_groups[0]["lr"])
        frozen.append(not any(p.requires_grad for p in encoder))
        optimizer.step()
        scheduler["scheduler"].step()
    assert lrs[:30] == pytest.approx([1e-4] * 30) and lrs[30:] == pytest.approx([1e-5] * 270)
    assert frozen == [True] * 30 + [False] * 270


@pytest.fixture(scope="module")
def ghostnet_file(tmp_path_factory):
    """A timm ghostnet_100 state dict (random init, the real key layout): the backbone the freeze applies to."""
    import timm

    path = tmp_path_factory.mktemp("ghostnet") / "ghostnet_100.pth"
    torch.save(timm.create_model("ghostnet_100", pretrained=False).state_dict(), path)
    return path


def test_frozen_backbone_does_not_change_then_trains(kvasir_subset, ghostnet_file, tmp_path, capsys):
    snapshots = Snapshots()
    tiny = ["data.size=64", "train.epochs=3", "train.batch_size=4", "data.num_workers=0",
            "train.freeze.epochs=1", "schedule.milestones=[1]", "optim.lr=1.0e-3", "model.decoder_widths=[64,32,16,16]"]
    recipe = load_recipe("fovea_unet", [*tiny, f"model.encoder_weights={ghostnet_file}"])
    run = train(recipe, kvasir_subset, out=tmp_path, progress=False, callbacks=[snapshots])
    assert "warning:" not in capsys.readouterr().out and run.config()["run"]["warnings"] == []
    start, after_frozen, after_trainable = snapshots.states[0], snapshots.states[1], snapshots.states[2]
    assert all(torch.equal(start[k], after_frozen[k]) for k in start)  # weights and BN statistics untouched
    assert any(not torch.equal(after_frozen[k], after_trainable[k]) for k in start if k.endswith("weight"))
    assert any(not torch.equal(after_frozen[k], after_trainable[k]) for k in start if k.endswith("running_mean"))
    with run.metrics_file.open() as handle:
        rows = list(csv.DictReader(handle))
    # Whether the focal loss falls over three epochs of 3 steps at lr 1e-3/1e-4/1e-5 depends on the draw;
    # the weight and statistics changes above are the proof that the unfrozen epochs train.
    assert all(math.isfinite(float(r["train_focal"])) and math.isfinite(float(r["train_nhsic"])) for r in rows)
    assert float(rows[0]["train_nhsic"]) == 0 and float(rows[1]["train_nhsic"]) > 0  # no nHSIC while frozen
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 1e-4, 1e-4])  # each epoch's own lr

    from medseg.engine.analyze import cka  # Fig. 5 on the trained run

    picture, mean = cka(run.path, kvasir_subset, "encoder.stages.1.0.0.ghost1.primary_conv", images=4, device="cpu")
    matrix = np.load(picture.with_suffix(".npy"))
    live = ~np.isnan(np.diag(matrix))  # channels constant over the images (dead after ReLU) have no CKA
    assert picture.is_file() and matrix.shape == (24, 24) and live.sum() > 12 and np.allclose(np.diag(matrix)[live], 1)
    assert -1 <= mean <= 1 and Image.open(picture).size == (24 * 10, 24 * 10)
    with pytest.raises(MedsegError, match="try one of the layers it names: encoder.stages.0.0.ghost1.primary_conv"):
        cka(run.path, kvasir_subset, "decoder.nope", images=4, device="cpu")
    default, _ = cka(run.path, kvasir_subset, images=4, device="cpu")  # the first layer the network names
    assert default.name == "cka-encoder.stages.0.0.ghost1.primary_conv.png"
    assert np.load(default.with_suffix(".npy")).shape == (8, 8)  # ghost1 of a 16-channel bottleneck: 8 intrinsic
    assert not [p for p in default.parent.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_freeze_names_unknown_groups_clearly(kvasir_subset, tmp_path):
    recipe = load_recipe("unet", ["model.base_channels=4", "data.size=64", "train.epochs=1", "data.num_workers=0",
                                  "train.freeze={groups: [backbone], epochs: 1}"])
    with pytest.raises(MedsegError, match=r"groups \['backbone'\].*its groups: \['decoder', 'encoder'\]"):
        train(recipe, kvasir_subset, out=tmp_path, progress=False)


def test_linear_cka_matrix():
    from medseg.engine.analyze import linear_cka_matrix

    torch.manual_seed(0)
    features = torch.randn(64, 3, 2, 2)  # 64 images, 4 positions: linear CKA separates unrelated channels
    features[:, 1] = 3.0 * features[:, 0]  # a scaled copy: CKA 1 (isotropic-scale invariant)
    matrix = linear_cka_matrix(features)
    assert torch.allclose(matrix.diagonal(), torch.ones(3, dtype=matrix.dtype))
    assert float(matrix[0, 1]) == pytest.approx(1.0) and matrix[0, 2] < 0.5 and torch.allclose(matrix, matrix.T)
    features[:, 2] = 0.0  # a dead channel: undefined, not 0 or 1
    matrix = linear_cka_matrix(features)
    assert torch.isnan(matrix[2]).all() and torch.isnan(matrix[:, 2]).all()
    assert float(matrix[0, 1]) == pytest.approx(1.0)
