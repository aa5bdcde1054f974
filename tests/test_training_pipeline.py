"""The training pipeline's parts on tiny CPU trainings: Lightning's loggers (metrics.csv one row per epoch,
TensorBoard, MLflow), curves.png, a resume that keeps metrics.csv consistent, FreezeGroups on schedule, and
what is refused before a run folder exists."""

import csv
import sys

import lightning as L
import pytest
import torch
from PIL import Image

from conftest import TINY
from medseg.config import load_recipe
from medseg.engine.callbacks import EpochCSVLogger, FreezeGroups, build_loggers
from medseg.engine.module import SegmentationModule
from medseg.engine.run import Run
from medseg.engine.train import train
from medseg.errors import MedsegError

COLUMNS = ["epoch", "train_loss", "train_bce", "train_dice", "val_dice", "val_iou", "val_loss", "val_mdice",
           "val_miou", "val_precision", "val_sensitivity", "lr", "seconds"]


def rows_of(run: Run) -> list[dict[str, str]]:
    with run.metrics_file.open(newline="") as handle:
        return list(csv.DictReader(handle))


def norm_modes(part: torch.nn.Module) -> set[bool]:
    return {m.training for m in part.modules() if isinstance(m, torch.nn.BatchNorm2d)}


class RecordFreezing(L.Callback):
    """At the first batch of each epoch: whether the encoder trains, its BatchNorm modes, the decoder's."""

    def __init__(self):
        self.epochs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx:
            return
        model = pl_module.model
        optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.epochs[trainer.current_epoch] = {
            "encoder_grad": {p.requires_grad for p in model.encoder.parameters()},
            "encoder_bn": norm_modes(model.encoder),
            "decoder_bn": norm_modes(model.decoder),
            "in_optimiser": all(id(p) in optimised for p in model.parameters()),
        }


@pytest.fixture(scope="module")
def logged(phantom, tmp_path_factory):
    """A 2-epoch U-Net on the phantom with every logger, initialised from a saved U-Net (a freeze applies only to
    weights that came from a file), the encoder frozen for the first epoch."""
    from medseg.models import create_model, save_model

    source = save_model(create_model("unet", 3, 1, base_channels=4),
                               tmp_path_factory.mktemp("source") / "unet")
    recipe = load_recipe("unet", [*TINY, "train.loggers=[csv, tensorboard, mlflow]",
                                  "train.freeze={groups: [encoder], epochs: 1}",
                                  f"model.weights={source / 'model.safetensors'}"])
    record = RecordFreezing()
    run = train(recipe, phantom, out=tmp_path_factory.mktemp("runs"), callbacks=[record], progress=False)
    return run, record


def test_metrics_csv_has_one_row_per_epoch_with_the_columns_of_every_term(logged):
    run, _ = logged
    rows = rows_of(run)
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert list(rows[0]) == COLUMNS
    assert all(value != "" for row in rows for value in row.values())
    assert float(rows[0]["train_loss"]) == pytest.approx(float(rows[0]["train_bce"]) + float(rows[0]["train_dice"]),
                                                         rel=1e-4)
    assert 0 < float(rows[1]["lr"]) <= float(rows[0]["lr"]) and float(rows[0]["seconds"]) > 0
    assert not (run.path / "hparams.yaml").exists() and not (run.path / "lightning_logs").exists()


def test_curves_png_is_a_valid_picture(logged):
    run, _ = logged
    picture = run.path / "curves.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(picture) as image:
        image.verify()
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 2 * image.height > 200
    assert not [p for p in run.path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_tensorboard_events_hold_the_epoch_metrics(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = logged
    events = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(run.path / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss_epoch", "train/dice_epoch", "val/dice", "val/loss", "lr-Adam/all", "seconds"} <= tags
    assert len(accumulator.Scalars("val/dice")) == 2


def test_mlflow_keeps_a_local_store_in_the_run_folder(logged):
    from mlflow.tracking import MlflowClient

    run, _ = logged
    store = run.path / "mlruns" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("medseg").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == run.path.name and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "val/dice")) == 2


def test_freeze_groups_freezes_then_unfreezes_in_training(logged):
    _, record = logged
    frozen, trainable = record.epochs[0], record.epochs[1]
    assert frozen["encoder_grad"] == {False} and frozen["encoder_bn"] == {False} and frozen["decoder_bn"] == {True}
    assert trainable["encoder_grad"] == {True} and trainable["encoder_bn"] == {True}
    assert frozen["in_optimiser"] and trainable["in_optimiser"]  # one optimiser layout throughout


def test_freeze_groups_schedule_and_console_lines(capsys):
    module = SegmentationModule(load_recipe("unet", TINY).to_dict())
    model = module.model
    callback = FreezeGroups(["encoder"], epochs=2)
    callback.freeze_before_training(module)
    assert all(p.requires_grad for p in model.parameters())  # the optimiser and DDP are built after this
    module.train()
    states = []
    for epoch in range(4):
        callback.finetune_function(module, epoch, torch.optim.SGD(model.parameters(), lr=0.1))
        states.append(({p.requires_grad for p in model.encoder.parameters()}, norm_modes(model.encoder)))
        assert all(p.requires_grad for p in model.decoder.parameters())
    assert states == [({False}, {False}), ({False}, {False}), ({True}, {True}), ({True}, {True})]
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 1: encoder frozen", "epoch 3: encoder trainable from now on"]
    with pytest.raises(MedsegError, match=r"groups \['backbone'\].*its groups: \['decoder', 'encoder'\]"):
        FreezeGroups(["backbone"], epochs=1).freeze_before_training(module)


class CrashAtValidationEnd(L.Callback):
    """Raise after epoch `epoch`'s validation was logged, before its checkpoint is saved."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_validation_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"killed after validating epoch {self.epoch}")


def test_resume_drops_the_rows_past_the_checkpoint_and_keeps_the_rest(phantom, tmp_path, capsys):
    recipe = load_recipe("unet", [*TINY, "train.epochs=3"])
    with pytest.raises(RuntimeError, match="killed after validating epoch 1"):
        train(recipe, phantom, out=tmp_path, name="killed", callbacks=[CrashAtValidationEnd(1)], progress=False)
    run = Run(tmp_path / "killed")
    assert torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)["epoch"] == 0
    before = rows_of(run)
    assert [int(r["epoch"]) for r in before] == [0, 1] and before[1]["val_dice"] and not before[1]["train_loss"]
    capsys.readouterr()
    train(recipe, phantom, out=tmp_path, name="killed", resume=True, progress=False)
    console = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in console if line.startswith("epoch ")] == ["epoch 2/3", "epoch 3/3"]
    assert console[-1].startswith("finished epoch 3/3 in 1 process(es) on cpu; best val/dice ")
    after = rows_of(run)
    assert [int(r["epoch"]) for r in after] == [0, 1, 2] and list(after[0]) == COLUMNS
    assert after[0] == before[0]  # the row of the checkpointed epoch is kept as it was
    assert all(value != "" for row in after for value in row.values())
    assert (run.path / "curves.png").is_file()


def test_the_table_drops_rows_from_the_epoch_a_fit_starts_at(tmp_path):
    path = tmp_path / "metrics.csv"
    table = EpochCSVLogger(path)
    table.start_at(0)
    for epoch in range(3):
        table.log_metrics({"lr-Adam/encoder": 0.1, "lr-Adam/decoder": 1.0}, step=epoch)  # no epoch: the next one
        table.log_metrics({"val/dice": 0.5 + epoch, "epoch": epoch}, step=epoch)
        table.log_metrics({"train/loss_step": 9.0, "train/loss_epoch": 1.0 / (epoch + 1), "epoch": epoch}, step=epoch)
        table.save()
    with path.open(newline="") as handle:
        assert next(csv.reader(handle)) == ["epoch", "train_loss", "val_dice", "lr_decoder", "lr_encoder"]
    reopened = EpochCSVLogger(path)
    reopened.start_at(2)
    reopened.log_metrics({"lr-Adam/encoder": 0.2, "lr-Adam/decoder": 2.0}, step=9)
    reopened.finalize("success")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["train_loss"], r["lr_encoder"]) for r in rows] == [("0", "1.0", "0.1"), ("1", "0.5", "0.1"),
                                                                             ("2", "", "0.2")]


def test_loggers_are_checked_when_the_recipe_loads():
    with pytest.raises(MedsegError, match=r"train\.loggers\.1: Input should be 'csv', 'tensorboard' or 'mlflow'"):
        load_recipe("unet", ["train.loggers=[csv, wandb]"])
    assert load_recipe("unet").train.loggers == ["csv"]
    assert load_recipe("unet", ["train.loggers=[tensorboard, csv]"]).train.loggers == ["csv", "tensorboard"]


@pytest.mark.parametrize("package", ["tensorboard", "mlflow"])
def test_a_missing_logger_package_is_one_line_before_the_run_folder(package, phantom, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it fails
    assert len(build_loggers(["csv"], tmp_path / "run")) == 1  # imported only when chosen
    recipe = load_recipe("unet", [*TINY, f"train.loggers=[{package}]"])
    with pytest.raises(MedsegError, match=rf"pip install 'medseg\[{package}\]'$"):
        train(recipe, phantom, out=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_an_empty_validation_split_is_refused_before_the_run_folder(phantom, tmp_path):
    recipe = load_recipe("unet", [*TINY, "data.split={val: 0, test: 0.2, seed: 0}"])
    with pytest.raises(MedsegError, match="the validation split is empty"):
        train(recipe, phantom, out=tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_without_a_progress_bar_a_line_per_tenth_of_an_epoch(capsys):
    from types import SimpleNamespace

    from medseg.engine.callbacks import EpochSummary

    summary = EpochSummary(progress_lines=True)
    trainer = SimpleNamespace(num_training_batches=20, current_epoch=1, max_epochs=3)
    summary.on_train_epoch_start(trainer, None)
    for index in range(20):
        summary.on_train_batch_end(trainer, None, {"loss": torch.tensor(float(index))}, None, index)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 9 and lines[0].startswith("epoch 2/3: 2/20 batches, loss 0.5, ")
    assert lines[-1].startswith("epoch 2/3: 18/20 batches, loss 8.5, ")
    quiet = EpochSummary(progress_lines=False)
    quiet.on_train_epoch_start(trainer, None)
    quiet.on_train_batch_end(trainer, None, torch.tensor(1.0), None, 1)
    assert capsys.readouterr().out == ""
