import pytest
import torch

import medseg
from medseg.config import OptimConfig, ScheduleConfig
from medseg.engine.optim import build_optimizer, build_scheduler, warmup_linear_factor
from medseg.errors import MedsegError


def test_warmup_linear_is_m2snet_triangle_by_default():
    epochs = 50
    for e in range(epochs):
        expected = 1 - abs(2 * (e + 1) / (epochs + 1) - 1)
        assert warmup_linear_factor(e, epochs, (epochs + 1) / 2) == pytest.approx(expected)


def _lrs(schedule: ScheduleConfig, epochs: int, steps: int = 1) -> list[float]:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1))
    scheduler = build_scheduler(optimizer, schedule, epochs, steps)["scheduler"]
    lrs = []
    for _ in range(epochs * steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules_follow_their_formulas():
    assert _lrs(ScheduleConfig(name="step", step_size=2, gamma=0.5), 5) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    multistep = ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.5)
    assert _lrs(multistep, 6) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert _lrs(ScheduleConfig(name="poly", power=1.0), 4) == pytest.approx([0.1, 0.075, 0.05, 0.025])
    cosine = _lrs(ScheduleConfig(name="cosine", min_lr=0.0), 4)
    assert cosine[0] == pytest.approx(0.1) and cosine[2] == pytest.approx(0.05)
    per_step = _lrs(ScheduleConfig(name="warmup_linear", interval="step", warmup_epochs=1), 3, steps=2)
    assert per_step == pytest.approx([0.05, 0.1, 0.08, 0.06, 0.04, 0.02])


def test_plateau_reacts_to_the_monitored_metric():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(name="adam", lr=0.1))
    config = build_scheduler(optimizer, ScheduleConfig(name="plateau", factor=0.5, patience=0), 10, 1)
    assert config["monitor"] == "val/loss"
    for loss in (1.0, 1.0, 1.0):
        config["scheduler"].step(loss)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_group_lr_multiplies_named_groups():
    model = medseg.create_model("unet", 3, 1, base_channels=4)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, nesterov=True, group_lr={"encoder": 0.1}))
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"encoder": 0.005, "decoder": 0.05})
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    with pytest.raises(MedsegError, match="unknown groups"):
        build_optimizer(model, OptimConfig(group_lr={"backbone": 0.1}))


def test_multistep_milestones_must_be_increasing_epochs():
    from pydantic import ValidationError

    for bad in ([], [0], [30, 30], [60, 30]):
        with pytest.raises(ValidationError, match="milestones must be increasing epochs >= 1"):
            ScheduleConfig(name="multistep", milestones=bad)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1))
    with pytest.raises(MedsegError, match="schedule multistep counts epochs"):
        build_scheduler(optimizer, ScheduleConfig(name="multistep", interval="step"), 10, 5)
