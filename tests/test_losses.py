import pytest
import torch
import torch.nn.functional as F

from medseg.errors import MedsegError
from medseg.losses import build_loss, create_loss, list_losses


@pytest.fixture()
def binary_pair():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, generator=g)
    target = (torch.rand(3, 8, 8, generator=g) > 0.6).long()
    target[2] = 0  # one empty mask
    return logits, target


def test_registry_has_the_standard_losses():
    assert {"bce", "ce", "dice", "focal"} <= set(list_losses())
    with pytest.raises(MedsegError, match="no option smoth"):
        create_loss("dice", smoth=1.0)


def test_bce_matches_torch(binary_pair):
    logits, target = binary_pair
    expected = F.binary_cross_entropy_with_logits(logits, target.unsqueeze(1).float())
    assert torch.allclose(create_loss("bce")(logits, target), expected)


def test_dice_per_image_and_batch_variants(binary_pair):
    logits, target = binary_pair
    p, g = torch.sigmoid(logits[:, 0]), target.float()
    per_image = torch.stack([1 - (2 * (p[i] * g[i]).sum() + 1) / (p[i].sum() + g[i].sum() + 1)
                             for i in range(3)]).mean()
    batch = 1 - (2 * (p * g).sum() + 1) / (p.sum() + g.sum() + 1)
    squared = 1 - (2 * (p * g).sum() + 0.5) / ((p * p).sum() + (g * g).sum() + 0.5)
    assert torch.allclose(create_loss("dice", smooth=1.0, per_image=True)(logits, target), per_image)
    assert torch.allclose(create_loss("dice", smooth=1.0, per_image=False)(logits, target), batch)
    assert torch.allclose(create_loss("dice", smooth=0.5, per_image=False, squared=True)(logits, target), squared)
    assert not torch.allclose(per_image, batch)


def test_multiclass_dice_uses_softmax_and_skips_background_unless_asked():
    logits = torch.randn(2, 3, 6, 6)
    labels = torch.randint(0, 3, (2, 6, 6))
    p = logits.softmax(1)
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2).float()
    dice = (2 * (p * one_hot).sum((2, 3)) + 1) / (p.sum((2, 3)) + one_hot.sum((2, 3)) + 1)
    assert torch.allclose(create_loss("dice")(logits, labels), 1 - dice[:, 1:].mean())
    assert torch.allclose(create_loss("dice", include_background=True)(logits, labels), 1 - dice.mean())


def test_focal_reduces_to_bce_and_ce_with_gamma_zero(binary_pair):
    logits, target = binary_pair
    bce = F.binary_cross_entropy_with_logits(logits, target.unsqueeze(1).float())
    assert torch.allclose(create_loss("focal", alpha=None, gamma=0.0)(logits, target), bce)
    multi, labels = torch.randn(2, 4, 5, 5), torch.randint(0, 4, (2, 5, 5))
    assert torch.allclose(create_loss("focal", alpha=None, gamma=0.0)(multi, labels), F.cross_entropy(multi, labels))
    # gamma > 0 down-weights easy pixels, so the loss is smaller than BCE
    assert create_loss("focal", alpha=None, gamma=2.0)(logits, target) < bce


def test_focal_alpha_weights_positives_and_negatives():
    logits = torch.zeros(1, 1, 2, 1)
    target = torch.tensor([[[1], [0]]])
    # (1-p_t)^2 = 1/4
    per_pixel = F.binary_cross_entropy_with_logits(logits[0, 0, :, 0], torch.tensor([1.0, 0.0])) * 0.25
    expected = (0.25 * per_pixel + 0.75 * per_pixel) / 2
    assert torch.allclose(create_loss("focal", alpha=0.25, gamma=2.0)(logits, target), expected)


def test_activation_mismatch_is_an_error_never_a_silent_zero():
    with pytest.raises(MedsegError, match="needs a multi-class output"):
        create_loss("ce")(torch.randn(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(MedsegError, match="is binary"):
        create_loss("bce")(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(MedsegError, match=r"binary targets must lie in \[0, 1\]"):
        create_loss("dice")(torch.randn(1, 1, 4, 4), torch.full((1, 4, 4), 2))
    with pytest.raises(MedsegError, match=r"labels must lie in \[0, 2\]"):
        create_loss("focal")(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 3))


def test_weighted_sum_reports_each_term(binary_pair):
    logits, target = binary_pair
    loss = build_loss([{"name": "bce", "weight": 0.5}, {"name": "dice", "weight": 2.0, "smooth": 1.0}])
    total, parts = loss(logits, target)
    assert set(parts) == {"bce", "dice"}
    assert torch.allclose(total, 0.5 * parts["bce"] + 2.0 * parts["dice"])
    with pytest.raises(MedsegError, match="lists a loss twice"):
        build_loss([{"name": "bce"}, {"name": "bce"}])


def test_deep_supervision_resizes_targets_and_weights_outputs():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:12, 4:12] = 1
    outputs = [torch.randn(2, 1, 16, 16, requires_grad=True), torch.randn(2, 1, 8, 8, requires_grad=True)]
    loss = build_loss([{"name": "bce"}], deep_supervision_weights=[1.0, 0.5])
    total, _ = loss(outputs, target)
    small = target[:, ::2, ::2]  # nearest resize of this mask is exact subsampling
    expected = F.binary_cross_entropy_with_logits(outputs[0][:, 0], target.float()) + \
        0.5 * F.binary_cross_entropy_with_logits(outputs[1][:, 0], small.float())
    assert torch.allclose(total, expected)
    total.backward()
    assert outputs[1].grad.abs().sum() > 0
    with pytest.raises(MedsegError, match="2 weights but the network returned 3"):
        loss(outputs + [outputs[0]], target)
    # a single output (eval mode) is scored on its own
    single, _ = loss(outputs[0], target)
    assert torch.allclose(single, F.binary_cross_entropy_with_logits(outputs[0][:, 0], target.float()))


def test_umnet_uncertainty_loss_follows_the_code_and_rewards_confident_correct_maps(binary_pair):
    # umICGNet's Deep_Loss per map, on sigmoid maps: S = (BCE + per-image Dice) / 2, v = log(1 + (p - g)^2),
    # L = mean(S * exp(-v)) + mean(v) with S a scalar
    logits, target = binary_pair
    p, g = torch.sigmoid(logits).flatten(1), target.float().flatten(1)
    dice = 1 - ((2 * (p * g).sum(1) + 1) / (p.sum(1) + g.sum(1) + 1)).sum() / 3
    structure = (torch.nn.BCELoss()(p, g) + dice) / 2
    variance = torch.log(1 + (p - g) ** 2)
    expected = torch.mean(structure * torch.exp(-variance)) + torch.mean(variance)
    loss = create_loss("umnet_uncertainty")
    assert torch.allclose(loss(logits, target), expected, atol=1e-6)
    confident = (target.unsqueeze(1).float() * 2 - 1) * 20
    assert loss(confident, target) < 0.01 < loss(-confident, target)
    with pytest.raises(MedsegError, match="binary"):
        loss(torch.randn(3, 2, 8, 8), target)
