"""Baselines of STS-Net's Table 1 (seed 003) and FocusNet's Table 2 (seed 004), second round: parameter counts
pinned to their sources, forward shapes at a small size, and a short CPU training check per network."""

import torch

import medseg
from medseg.config import load_recipe
from medseg.losses import build_loss


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(2, size, size, dtype=torch.long)
    truth[0, 4:20, 6:22] = 1
    truth[1, 15:30, 3:13] = 1
    images = torch.randn(2, 3, size, size, generator=g) + 1.5 * truth[:, None].float()  # learnable signal
    return images, truth


def _recipe_losses(recipe_name: str, size: int = 32, steps: int = 3) -> list[float]:
    """The recipe's loss over a few steps of its optimiser (Adam / SGD at its lr) on one tiny batch."""
    recipe = load_recipe(recipe_name)
    torch.manual_seed(0)
    model = medseg.create_model(recipe.model.name, 3, recipe.model.num_classes, **recipe.model.options()).train()
    criterion = build_loss(recipe.to_dict()["loss"], recipe.train.deep_supervision_weights)
    from medseg.engine.optim import build_optimizer

    optimizer = build_optimizer(model, recipe.optim)
    images, truth = _batch(size)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, _ = criterion(model(images), truth)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    return losses


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
    losses = _recipe_losses("centroidnet_v2", steps=2)  # Adam at 1e-3 on this BN-free net spikes at step 3
    assert losses[-1] < losses[0]
