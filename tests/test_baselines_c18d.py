"""Baselines of STS-Net's Table 1 (seed 003) and FocusNet's Table 2 (seed 004), second round: parameter counts
pinned to their sources, forward shapes at a small size, and a short CPU training check per network."""

import torch
from tests.baseline_training import n_params, recipe_training_losses

import medseg


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
    # Adam at 1e-3 on this BN-free net spikes at step 3
    losses = recipe_training_losses("centroidnet_v2", size=32, steps=2, optimiser="recipe")
    assert losses[-1] < losses[0]
