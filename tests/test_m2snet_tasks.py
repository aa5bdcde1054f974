"""M2SNet's other tasks (arXiv:2303.10894 Sec. 4.1-4.4): the COVID-19, BUSI and GOALS recipes, the multi-class
structure and LossNet losses, the infnet and goals protocols, and the BUSI four-fold study."""

import json
import math
from pathlib import Path

import numpy as np
import py_sod_metrics as sod
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medseg.config import list_recipes, load_recipe
from medseg.data.phantom import make_phantom
from medseg.engine.evaluate import evaluate
from medseg.engine.study import plan_study, read_study
from medseg.engine.study_report import higher_is_better
from medseg.engine.train import train
from medseg.losses import create_loss
from medseg.metrics import get_protocol
from medseg.metrics.layers import layer_distances

TASKS = {"m2snet_covid": (200, 1, "infnet"), "m2snet_busi": (100, 1, "paper"), "m2snet_goals": (100, 4, "goals")}
# one tiny epoch: 64 px, no multi-scale sizes, batch 4, the loader in this process
TINY = ["data.size=64", "data.multiscale=null", "train.epochs=1", "train.batch_size=4", "data.num_workers=0"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_recipe_is_the_polyp_strategy_with_its_own_epochs_classes_and_metrics(name):
    epochs, classes, protocol = TASKS[name]
    assert name in list_recipes()
    recipe, polyp = load_recipe(name), load_recipe("m2snet")
    assert (recipe.train.epochs, recipe.model.num_classes, recipe.eval.protocol) == (epochs, classes, protocol)
    # Sec. 4.3: "the above training strategy is used for all ... only in the number of training epochs"
    assert recipe.optim == polyp.optim and recipe.schedule == polyp.schedule and recipe.loss == polyp.loss
    assert (recipe.data.size, recipe.data.multiscale, recipe.data.augment) == (352, polyp.data.multiscale,
                                                                                 polyp.data.augment)
    assert recipe.train.batch_size == 16 and recipe.model.name == "m2snet"


@pytest.fixture(scope="module")
def lossnet():
    with pytest.warns(UserWarning, match="random-feature loss"):  # no local VGG-16 file here: said, not hidden
        torch.manual_seed(0)
        return create_loss("lossnet")


def test_two_class_structure_and_lossnet_equal_the_binary_losses(lossnet):
    """softmax([0, x])[1] = sigmoid(x): the per-class forms reduce to the binary ones exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 40, 40, generator=g)
    truth = torch.zeros(2, 40, 40, dtype=torch.long)
    truth[:, 8:25, 10:33] = 1
    two = torch.cat([torch.zeros_like(x), x], dim=1)
    for wbce in ("reference", "weighted"):
        loss = create_loss("structure", wbce=wbce)
        assert torch.allclose(loss(two, truth), loss(x, truth), atol=1e-6), wbce
    assert torch.allclose(lossnet(two[:1], truth[:1]), lossnet(x[:1], truth[:1]), atol=1e-6)


def test_multiclass_structure_loss_on_a_hand_checked_case():
    """Uniform logits over three classes on a 4x4 image that is all class 1: every 31x31 window (padding 15, zero
    padding counted) covers the whole image, so AvgPool(G_1) = 16/961 everywhere and AvgPool(G_2) = 0."""
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    truth = torch.ones(1, 4, 4, dtype=torch.long)
    w1 = 1 + 5 * (1 - 16 / 961)  # class 1's boundary weight at every pixel; class 2's is 1
    wiou1 = 1 - (w1 * 16 / 3 + 1) / (w1 * 16 + 1)  # p = 1/3: inter = w1 16/3, union - inter = w1 (16 + 16/3) - w1 16/3
    wiou2 = 1 - 1 / (16 / 3 + 1)  # no class-2 pixel: inter 0, union 16/3
    expected = math.log(3) + (wiou1 + wiou2) / 2  # softmax CE of uniform logits is log 3; wIoU over classes 1, 2
    value = create_loss("structure")(logits, truth)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    value.backward()
    assert logits.grad[0, 1].sum() < 0 < logits.grad[0, 2].sum()  # raise the true class, lower the absent one
    weighted = (w1 + 1) / 2  # weighted CE: the per-pixel weight is the same everywhere, so the mean is unchanged
    assert weighted > 1 and create_loss("structure", wbce="weighted")(logits, truth).item() == pytest.approx(expected)


def test_multiclass_lossnet_is_the_mean_of_the_per_class_binary_lossnets(lossnet):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 32, 32, generator=g)
    truth = torch.randint(0, 3, (1, 32, 32), generator=g)
    probs = logits.softmax(dim=1)
    per_class = [lossnet(torch.logit(probs[:, k:k + 1].double()).float(), (truth == k).long()) for k in (1, 2)]
    assert lossnet(logits, truth).item() == pytest.approx(torch.stack(per_class).mean().item(), rel=1e-4)


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    return F.one_hot(labels, classes).permute(2, 0, 1).float()


def test_goals_protocol_dice_and_layer_edge_distance_by_hand():
    truth = torch.zeros(6, 5, dtype=torch.long)
    truth[1:3] = 1  # layer 1: rows 1-2 in every column
    truth[3:5] = 2  # layer 2: rows 3-4
    pred = truth.clone()
    pred[3, :4] = 1  # columns 0-3: layer 1 reaches one row lower, layer 2 starts one row lower
    assert layer_distances(pred, truth, 3) == pytest.approx([0.4, 0.4])  # 4 columns (0 + 1) / 2, 1 column 0: 2 / 5
    scorer = get_protocol("goals").scorer(3)
    scorer.add(_one_hot(pred, 3), truth)
    per_case = scorer.per_case()
    # layer 1: tp 10, fp 4, fn 0 -> 20 / 24; layer 2: tp 6, fp 0, fn 4 -> 12 / 16
    assert per_case["dice_class1"] == pytest.approx([20 / 24]) and per_case["dice_class2"] == pytest.approx([0.75])
    assert per_case["dice"] == pytest.approx([(20 / 24 + 0.75) / 2])
    assert per_case["med_class1"] == pytest.approx([0.4]) and per_case["med"] == pytest.approx([0.4])
    missing = torch.zeros_like(truth)
    missing[1:3] = 1  # layer 2 never predicted: no column pairs, so its distance is NaN and med is layer 1's
    scorer.add(_one_hot(missing, 3), truth)
    summary = scorer.summary()
    assert math.isnan(scorer.per_case()["med_class2"][1]) and scorer.per_case()["med"][1] == 0
    assert summary["med_class2"]["n"] == 1 and summary["med_class2"]["n_nan"] == 1
    assert summary["med"]["value"] == pytest.approx(0.2)
    assert not higher_is_better("med") and not higher_is_better("med_class3") and higher_is_better("dice_class3")
    assert get_protocol("goals").definition()["metrics"] == ["dice", "med"]


def test_infnet_protocol_confusion_metrics_by_hand_and_maps_as_pysodmetrics():
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[2:6, 2:6] = 1  # 16 lesion pixels
    prob = torch.zeros(1, 8, 8)
    prob[0, 2:6, 2:5] = 0.9  # 12 of them found, nothing else
    prob[0, 0, 0] = 0.4  # below 0.5: background for the confusion metrics, but part of the map
    scorer = get_protocol("infnet").scorer(1)
    scorer.add(prob, mask)
    per_case = scorer.per_case()
    assert list(per_case) == ["dice", "sensitivity", "precision", "sm", "mae"]
    assert per_case["dice"] == pytest.approx([24 / 28]) and per_case["sensitivity"] == pytest.approx([0.75])
    assert per_case["precision"] == pytest.approx([1.0])
    sm, mae = sod.Smeasure(), sod.MAE()
    prediction, truth = (prob[0] * 255).round().to(torch.uint8).numpy(), (mask.numpy() * 255).astype(np.uint8)
    sm.step(prediction, truth)
    mae.step(prediction, truth)
    assert per_case["sm"] == pytest.approx([sm.get_results()["sm"]]) and per_case["mae"] == pytest.approx(
        [mae.get_results()["mae"]])


@pytest.mark.parametrize("name,metrics", [("m2snet_covid", ["dice", "sensitivity", "precision", "sm", "mae"]),
                                          ("m2snet_busi", ["dice", "iou", "sensitivity", "specificity", "precision"])])
def test_binary_task_recipes_train_one_tiny_epoch_and_report_their_tables_metrics(name, metrics, tmp_path):
    data = make_phantom(tmp_path / "phantom", n=8, size=64, seed=5)  # 4 training images: one step (LossNet is slow)
    recipe = load_recipe(name, [*TINY, "data.split={val: 0.25, test: 0.25, seed: 0}"])
    run = train(recipe, data, out=tmp_path / "runs", progress=False)
    assert any(note.startswith("lossnet runs on a random VGG-16") for note in run.config()["run"]["warnings"])
    scored = evaluate(run.path, data, None, "test", overlays=0, workers=0)
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["protocol"]["name"] == recipe.eval.protocol and summary["cases"] == 2
    assert set(metrics) <= set(summary["metrics"])
    assert all(0 <= summary["metrics"][m]["value"] <= 1 for m in metrics)


def _layer_phantom(root: Path, n: int = 8, size: int = 64) -> Path:
    """OCT-like B-scans: three wavy bands (labels 1, 2, 3) of their own brightness on a dark background, noise;
    masks are single-channel label PNGs 0..3."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, cols = np.mgrid[:size, :size]
    for i in range(n):
        top = 14 + 4 * np.sin(cols[0] / size * 2 * np.pi + rng.uniform(0, 6)) + rng.uniform(-3, 3)
        edges = np.cumsum([top, np.full(size, 7.0), np.full(size, 9.0), np.full(size, 8.0), np.full(size, 10.0)], 0)
        labels = np.zeros((size, size), np.uint8)
        for k, (upper, lower) in zip((1, 2, 0, 3), zip(edges[:-1], edges[1:])):  # a gap of other retina at label 0
            labels[(rows >= upper) & (rows < lower)] = k
        brightness = np.array([0.15, 0.85, 0.5, 0.65])[labels] + rng.normal(0, 0.05, labels.shape)
        Image.fromarray((brightness.clip(0, 1) * 255).astype(np.uint8)).save(root / "images" / f"oct{i:02d}.png")
        Image.fromarray(labels).save(root / "masks" / f"oct{i:02d}.png")
    return root


def test_goals_recipe_trains_a_four_class_m2snet_on_a_layer_phantom_and_reports_dice_and_med(tmp_path):
    data = _layer_phantom(tmp_path / "layers")
    recipe = load_recipe("m2snet_goals", [*TINY, "data.split={val: 0.25, test: 0.25, seed: 0}"])
    run = train(recipe, data, out=tmp_path / "runs", progress=False)
    assert any(note.startswith("lossnet runs on a random VGG-16") for note in run.config()["run"]["warnings"])
    scored = evaluate(run.path, data, None, "test", overlays=0, workers=0)
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["protocol"]["name"] == "goals" and summary["model"]["num_classes"] == 4
    per_case = (scored / "per_case.csv").read_text().splitlines()[0].split(",")
    assert [c for c in per_case if c.startswith(("dice", "med"))] == [
        "dice", "dice_class1", "dice_class2", "dice_class3", "med", "med_class1", "med_class2", "med_class3"]
    assert all(0 <= summary["metrics"][f"dice_class{k}"]["value"] <= 1 for k in (1, 2, 3))


def test_the_busi_study_runs_m2snet_msnet_and_the_baselines_over_four_disjoint_folds(phantom, tmp_path):
    study, base = read_study("m2snet-table4", data=[str(phantom)])
    plan = plan_study(study, base, tmp_path)
    assert plan.protocol == "paper" and plan.reference == "unet"
    models = {"unet", "unetpp", "attention_unet", "transunet", "utnet", "skunet", "nunet", "msnet", "m2snet"}
    assert {c.model for c in plan.cells} == models
    assert sorted({c.fold for c in plan.cells}) == [0, 1, 2, 3] and len(plan.cells) == len(models) * 4
    recipes = {c.model: plan.jobs[c.run].recipe for c in plan.cells}
    assert recipes["msnet"]["model"]["name"] == "msnet" and recipes["m2snet"]["model"]["name"] == "m2snet"
    assert recipes["m2snet"]["train"]["epochs"] == 100 and recipes["msnet"]["eval"]["protocol"] == "paper"
    # the paper's U-Net baselines on its Res2Net-50 encoder, trained as M2SNet without its LossNet term
    assert [recipes[m]["model"]["name"] for m in ("unet", "unetpp", "attention_unet")] == [
        "unet_res2net50", "unetpp_res2net50", "attention_unet_res2net50"]
    assert [term["name"] for term in recipes["unet"]["loss"]] == ["structure"]
    assert recipes["unet"]["train"]["epochs"] == 100
    stems = sorted(p.stem for p in (phantom / "images").iterdir())
    for model in ("unet", "m2snet"):
        folds = [plan.jobs[c.run].splits for c in sorted(plan.cells, key=lambda c: c.fold) if c.model == model]
        tests = [set(s["test"]) for s in folds]
        assert sorted(s for t in tests for s in t) == stems  # every case tested exactly once
        for split in folds:
            assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    # every model sees the same folds
    assert ({c.fold: plan.jobs[c.run].splits["test"] for c in plan.cells if c.model == "unet"}
            == {c.fold: plan.jobs[c.run].splits["test"] for c in plan.cells if c.model == "m2snet"})


def test_the_recipes_command_lists_the_task_recipes_with_their_protocols():
    from typer.testing import CliRunner

    from medseg.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["recipes"], terminal_width=250)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:6]]
            for line in result.stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip()}
    assert rows["m2snet_goals"] == ["m2snet", "4", "100", "goals"]
    assert rows["m2snet_covid"] == ["m2snet", "1", "200", "infnet"] and rows["m2snet_busi"][3] == "paper"
    assert set(rows) == set(list_recipes())
    help_text = runner.invoke(app, ["recipes", "--help"], terminal_width=200)
    assert help_text.exit_code == 0 and "Example: medseg recipes" in help_text.stdout
