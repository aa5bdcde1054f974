"""Baselines of STS-Net's Table 1 (seed 003) and FocusNet's Table 2 (seed 004), second round: parameter counts
pinned to their sources, forward shapes at a small size, and a short CPU training check per network."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.baseline_training import n_params, recipe_training_losses

import medseg
from medseg.errors import MedsegError
from medseg.models.centroidnet import instance_map, vector_targets


# CentroidNetV2: kdijkstra13/OpenCentroidNetV2 centroidnet_core.py builds UNet(num_classes + 4, 3 in, depth 5,
# start_filts 64); with 2 classes (background + lesion) that code counts 31,032,070 parameters; STS-Net Table 1: 31.03M.
def test_centroidnet_v2_parameter_count_is_the_reference_codes():
    model = medseg.create_model("centroidnet_v2", 3, 2)
    assert n_params(model) == 31_032_070
    assert round(n_params(model) / 1e6, 2) == 31.03
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the code's U-Net has no BN


def test_centroidnet_v2_returns_logits_and_its_vector_fields():
    model = medseg.create_model("centroidnet_v2", 3, 2).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        everything = model.all_outputs(x)
        assert everything.shape == (1, 6, 64, 80)
        assert torch.equal(model(x), everything[:, 4:])  # the code's order: 4 vector channels, then the logits
        assert torch.equal(model.vector_fields(x), everything[:, :4])


def test_centroidnet_v2_recipe_trains_on_cpu():
    # CE + both vector terms (the recipe's extra_loss_weights); Adam at 1e-3 on this BN-free net spikes at step 3
    losses = recipe_training_losses("centroidnet_v2", size=32, steps=2, optimiser="recipe")
    assert losses[-1] < losses[0]


def test_centroidnet_v2_instances_are_each_classes_8_connected_components():
    labels = np.array([[1, 0, 0, 2],
                       [0, 1, 0, 2],
                       [0, 0, 0, 1]])
    instances, count = instance_map(labels)
    assert count == 3  # the diagonal pair of class 1 is one object; the class-2 bar and the class-1 pixel below it two
    assert instances[0, 0] == instances[1, 1] != instances[2, 3]
    assert len({instances[0, 0], instances[0, 3], instances[2, 3]}) == 3 and instances[0, 1] == 0


def test_centroidnet_v2_vector_targets_of_two_blobs_by_hand():
    labels = np.zeros((12, 16), dtype=np.int64)
    labels[2:5, 2:5] = 1    # blob A: centroid (3, 3); every pixel but the middle one is a border pixel
    labels[8:10, 10:14] = 1  # blob B: centroid (8.5, 11.5); all border
    targets = vector_targets(labels, max_dist=4) * 4  # back to pixels: (centroid dy, dx, border dy, dx)
    assert np.allclose(targets[:, 0, 0], [3, 3, 2, 2])  # to A's centroid and A's nearest border pixel (2, 2)
    assert np.allclose(targets[:2, 3, 3], 0) and np.isclose(np.hypot(*targets[2:, 3, 3]), 1)  # A's middle pixel
    assert np.allclose(targets[:, 8, 12], [0.5, -0.5, 0, 0])  # a border pixel of B: its border vector is 0
    assert np.allclose(targets[:, 11, 15], [-2.5, -3.5, -2, -2])  # nearest centroid B, B's nearest border (9, 13)
    assert np.allclose(targets[:, 11, 0], 0)  # A's nearest border (4, 2) is 7.3 px away, past max_dist: no vote
    assert np.array_equal(vector_targets(np.zeros((8, 8), dtype=np.int64)), np.zeros((4, 8, 8)))  # no objects


def _code_vector_targets(labels: np.ndarray, max_dist: float) -> tuple[np.ndarray, np.ndarray]:
    """The reference code's encoding by brute force over every pixel (its edge detector's variance filters, nearest
    centroid, nearest border pixel of that instance), on our instances; and where a tie made the choice arbitrary."""
    instances, count = instance_map(labels)
    height, width = labels.shape
    padded = F.pad(torch.from_numpy(instances.astype(np.float64))[None, None], (1, 1, 1, 1))

    def variance(window: list[list[float]]) -> torch.Tensor:
        kernel = torch.tensor(window, dtype=torch.float64)[None, None]
        return F.conv2d(padded ** 2, kernel) / kernel.sum() - (F.conv2d(padded, kernel) / kernel.sum()) ** 2

    edges = variance([[0, 0, 0], [0, 1, 1], [0, 1, 1]]) + variance([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    border_ids = np.where(edges[0, 0].numpy() > 0, instances, 0)
    pixels = np.argwhere(np.ones((height, width), dtype=bool)).astype(float)
    centroids = np.array([np.argwhere(instances == k).mean(axis=0) for k in range(1, count + 1)])
    to_centroids = np.linalg.norm(centroids[None] - pixels[:, None], axis=2)
    owner = to_centroids.argmin(axis=1)
    tied = (np.abs(to_centroids - to_centroids.min(axis=1, keepdims=True)) < 1e-9).sum(axis=1) > 1
    centroid_vectors = centroids[owner] - pixels
    border_vectors = np.zeros_like(pixels)
    for k in range(count):
        rows = owner == k
        borders = np.argwhere(border_ids == k + 1)
        to_borders = np.linalg.norm(borders[None] - pixels[rows, None], axis=2)
        border_vectors[rows] = borders[to_borders.argmin(axis=1)] - pixels[rows]
        tied[rows] |= (np.abs(to_borders - to_borders.min(axis=1, keepdims=True)) < 1e-9).sum(axis=1) > 1
    far = np.linalg.norm(border_vectors, axis=1) > max_dist
    centroid_vectors[far] = border_vectors[far] = 0
    targets = np.concatenate([centroid_vectors, border_vectors], axis=1) / max_dist
    return targets.T.reshape(4, height, width), tied.reshape(height, width)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("max_dist", [5, 100])
def test_centroidnet_v2_vector_targets_match_the_codes_encoding(seed, max_dist):
    rng = np.random.default_rng(seed)
    labels = np.zeros((28, 36), dtype=np.int64)
    yy, xx = np.mgrid[:28, :36]
    for _ in range(5):  # discs and bars of two classes, overlapping, touching each other and the image's edges
        y, x, r = rng.integers(0, 28), rng.integers(0, 36), rng.integers(1, 7)
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= r ** 2
        shape = disc if rng.random() < 0.5 else (abs(yy - y) <= r) & (abs(xx - x) < 2)
        labels[shape] = rng.integers(1, 3)
    ours = vector_targets(labels, max_dist)
    code, tied = _code_vector_targets(labels, max_dist)
    assert np.allclose(ours[:, ~tied], code[:, ~tied], atol=1e-6)
    for field in (slice(0, 2), slice(2, 4)):  # at ties only the direction may differ
        assert np.allclose(np.linalg.norm(ours[field], axis=0), np.linalg.norm(code[field], axis=0), atol=1e-6)


def test_centroidnet_v2_vector_losses_train_the_vector_channels_only():
    model = medseg.create_model("centroidnet_v2", 3, 2, base_channels=4, max_dist=8).train()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.long)
    mask[0, 10:30, 12:40] = 1
    mask[0, 44:60, 5:20] = 1
    mask[1, 20:50, 30:50] = 1
    logits = model(x)
    assert model.kept_for_losses is not None
    losses = model.extra_losses(mask)
    assert model.kept_for_losses is None  # released after use
    vectors = model.all_outputs(x)[:, :4]
    targets = torch.from_numpy(np.stack([vector_targets(m, 8) for m in mask.numpy()]))
    for name, field in (("centroid", slice(0, 2)), ("border", slice(2, 4))):  # the code's sqrt-of-squares mean
        assert torch.isfinite(losses[name])
        assert torch.allclose(losses[name], (vectors[:, field] - targets[:, field]).pow(2).sum(dim=1).sqrt().mean())
    (losses["centroid"] + losses["border"]).backward()
    gradient = model.head.weight.grad.flatten(1).abs().sum(dim=1)
    assert (gradient[:4] > 0).all() and (gradient[4:] == 0).all()  # the vector channels, not the logits
    assert logits.shape == (2, 2, 64, 64)
    with pytest.raises(MedsegError, match="training forward"):
        model.extra_losses(mask)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model.all_outputs(x)[:, 4:]) and model.kept_for_losses is None


def test_centroidnet_v2_recipe_trains_the_vector_terms_through_the_engine():
    from medseg.config import load_recipe
    from medseg.engine.module import SegmentationModule

    module = SegmentationModule(load_recipe("centroidnet_v2", ["model.base_channels=4"]).to_dict())
    images, truth = torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32, dtype=torch.long)
    truth[:, 8:20, 10:24] = 1
    loss, parts = module.training_loss({"image": images, "mask": truth})
    assert set(parts) == {"ce", "centroid", "border"}
    assert torch.allclose(loss, parts["ce"] + parts["centroid"] + parts["border"])  # the code's weights, 1 each
