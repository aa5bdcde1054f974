import csv
import json

import lightning as L
import pytest
import torch
import yaml

import medseg
from conftest import TINY, run_cli
from medseg.config import load_recipe
from medseg.engine.run import Run
from medseg.engine.train import train
from medseg.models.base import ExtraLosses


def test_run_folder_is_complete_and_self_describing(tiny_run):
    run = tiny_run
    for part in ("config.yaml", "splits.json", "metrics.csv", "curves.png", "checkpoints/best.ckpt",
                 "checkpoints/last.ckpt", "model/config.json", "model/model.safetensors"):
        assert (run.path / part).is_file(), part
    config = yaml.safe_load(run.config_file.read_text())
    assert config["model"]["base_channels"] == 4 and config["train"]["epochs"] == 2
    assert config["run"]["versions"]["torch"] and config["run"]["seed"] == 0 and "git_commit" in config["run"]
    splits = json.loads(run.splits_file.read_text())
    assert set(splits) == {"train", "val", "test"} and not set(splits["train"]) & set(splits["test"])
    with run.metrics_file.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert list(rows[0]) == ["epoch", "train_loss", "train_bce", "train_dice", "val_dice", "val_iou", "val_loss",
                             "val_mdice", "val_miou", "val_precision", "val_sensitivity", "lr", "seconds"]
    assert all(value != "" for row in rows for value in row.values())
    assert not list(run.path.glob("lightning_logs")) and not list(run.path.glob("version_*"))
    model_config = json.loads((run.model_dir / "config.json").read_text())
    assert model_config["preprocessing"] == {"size": [64, 64], "in_channels": 3, "normalize": "imagenet"}
    model = medseg.load_model(run.path)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


class Crash(Exception):
    pass


class CrashAtEpoch(L.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Crash(f"killed at the start of epoch {self.epoch}")


class RecordStart(L.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if not hasattr(self, "epoch"):
            self.epoch = trainer.current_epoch
            self.optimizer = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                              for k, s in trainer.optimizers[0].state_dict()["state"].items()}


def test_resume_continues_from_last_with_the_same_optimiser_state(phantom, tmp_path):
    recipe = load_recipe("unet", [*TINY, "train.epochs=3"])
    with pytest.raises(Crash):
        train(recipe, phantom, out=tmp_path, name="crashed", callbacks=[CrashAtEpoch(1)], progress=False)
    run = Run(tmp_path / "crashed")
    saved = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0
    record = RecordStart()
    train(recipe, phantom, out=tmp_path, name="crashed", resume=True, callbacks=[record], progress=False)
    assert record.epoch == 1  # the second epoch, not a restart
    saved_state = saved["optimizer_states"][0]["state"]
    assert saved_state and set(record.optimizer) == set(saved_state)
    for key, state in saved_state.items():
        assert torch.equal(record.optimizer[key]["exp_avg"], state["exp_avg"])
        assert torch.equal(record.optimizer[key]["step"], state["step"])
    with run.metrics_file.open() as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [0, 1, 2]
    assert len(yaml.safe_load(run.config_file.read_text())["run"]["resumed"]) == 1
    assert (run.model_dir / "model.safetensors").is_file()


def test_last_checkpoint_is_the_last_epoch_even_when_it_is_not_the_best(phantom, tmp_path):
    # monitor "epoch" in min mode: epoch 0 is the best and no later epoch improves on it
    recipe = load_recipe("unet", [*TINY, "train.epochs=3", "train.monitor=epoch", "train.monitor_mode=min",
                                  "eval.checkpoint=last"])
    run = train(recipe, phantom, out=tmp_path, progress=False)
    last = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
    best = torch.load(run.best_checkpoint, map_location="cpu", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 2)
    exported = medseg.load_model(run.model_dir).state_dict()
    assert all(torch.equal(value, last["state_dict"][f"model.{key}"]) for key, value in exported.items())


def test_resume_without_a_run_is_a_clear_error(phantom, tmp_path):
    with pytest.raises(medseg.errors.MedsegError, match="nothing to resume"):
        train(load_recipe("unet", TINY), phantom, out=tmp_path, resume=True)


def test_two_gloo_processes_train_with_ddp_on_cpu(phantom, tmp_path):
    sets = [arg for item in TINY for arg in ("--set", item)]
    result = run_cli("train", "--recipe", "unet", "--data", str(phantom), "--out", str(tmp_path), "--devices", "2",
                     *sets, "--set", "train.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in 2 process(es) on cpu" in result.stdout
    run = Run(next(tmp_path.iterdir()))
    assert (run.model_dir / "model.safetensors").is_file()
    with run.metrics_file.open() as handle:
        assert len(list(csv.DictReader(handle))) == 1  # one row, from rank zero only


class ExtraLossModel(torch.nn.Module, ExtraLosses):
    """A 1x1-conv network that reports an extra loss (the ExtraLosses capability), to test the trainer's hook."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, x):
        self.last = self.conv(x)
        return self.last

    def extra_losses(self, mask):
        return {"l2": (self.last.squeeze(1) - mask).pow(2).mean()}  # a target from the mask


def test_extra_losses_are_added_with_recipe_weights(phantom):
    from medseg.engine.module import SegmentationModule

    module = SegmentationModule(load_recipe("unet", [*TINY, "train.extra_loss_weights={l2: 0.5}"]).to_dict())
    module.model = ExtraLossModel()
    batch = {"image": torch.randn(2, 3, 8, 8), "mask": torch.randint(0, 2, (2, 8, 8))}
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # log_dict logs through log
    total = module.training_step(batch, 0)
    assert set(logged) == {"train/loss", "train/bce", "train/dice", "train/l2"}  # each term, for metrics.csv
    base, _ = module.criterion(module.model.last, batch["mask"])
    l2 = (module.model.last.squeeze(1) - batch["mask"]).pow(2).mean()
    assert torch.allclose(total, base + 0.5 * l2)
    assert torch.equal(logged["train/loss"], total)
    assert torch.allclose(logged["train/l2"], l2)
    module.recipe.train.extra_loss_weights = {}
    with pytest.raises(medseg.errors.MedsegError, match="extra losses \\['l2'\\]"):
        module.training_step(batch, 0)


def phantom_splits(phantom) -> dict[str, list[str]]:
    stems = sorted(path.stem for path in (phantom / "images").glob("*.png"))
    return {"train": stems[:16], "val": stems[16:20], "test": stems[20:]}


def test_given_splits_are_the_runs_splits_and_a_resume_keeps_them(phantom, tmp_path):
    given = phantom_splits(phantom)
    recipe = load_recipe("unet", [*TINY, "train.epochs=1"])
    run = train(recipe, phantom, out=tmp_path, name="fold", progress=False, splits=given)
    assert json.loads(run.splits_file.read_text()) == given
    assert yaml.safe_load(run.config_file.read_text())["run"]["splits"] == "given by the caller"
    moved = {**given, "train": given["train"][1:], "val": [given["train"][0], *given["val"]]}
    with pytest.raises(medseg.errors.MedsegError, match=r"trained with other train/val stems than the splits given"):
        train(recipe, phantom, out=tmp_path, name="fold", resume=True, progress=False, splits=moved)
    reordered = {name: stems[::-1] for name, stems in given.items()}
    train(recipe, phantom, out=tmp_path, name="fold", resume=True, progress=False, splits=reordered)
    assert json.loads(run.splits_file.read_text()) == given
    assert len(yaml.safe_load(run.config_file.read_text())["run"]["resumed"]) == 1


def test_given_splits_are_labelled_with_their_source(phantom):
    from medseg.engine.train import prepare_data

    given = phantom_splits(phantom)
    datamodule = prepare_data(load_recipe("unet", TINY), phantom, given, "study polyp-cpu fold 2 of 5")
    assert datamodule.splits == given and datamodule.split_source == "study polyp-cpu fold 2 of 5"


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: {**s, "train": [*s["train"], "no_such_case"]}, r"the splits 'given by the caller' names 1 stems that "
                                                               r"have no image/mask pair, e.g. \['no_such_case'\]"),
    (lambda s: {**s, "test": [*s["test"], s["val"][0]]}, r"is in both 'val' and 'test'"),
    (lambda s: {**s, "val": []}, r"the validation split is empty"),
    (lambda s: {"train": s["train"]}, r"must have 'train' and 'val'"),
])
def test_given_splits_are_checked_before_the_run_folder_exists(phantom, tmp_path, change, message):
    with pytest.raises(medseg.errors.MedsegError, match=message) as excinfo:
        train(load_recipe("unet", TINY), phantom, out=tmp_path, name="refused", progress=False,
              splits=change(phantom_splits(phantom)))
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "refused").exists()
