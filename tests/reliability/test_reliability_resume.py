"""Reliability catalogue, training faults: kill -9 in the middle of an epoch, then `--resume`, reproduces the
uninterrupted run exactly (CPU, same seed); resuming picks the right folder; extending a finished run re-plans
its schedule."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY

KILLED = -9

TRAIN = textwrap.dedent('''
    import os, signal, sys
    import lightning as L
    import torch
    from medseg.config import load_recipe
    from medseg.engine.train import train

    torch.set_num_threads(1)
    data, out, name, epochs, kill_epoch, kill_batch, resume, workers = sys.argv[1:9]

    class KillAt(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == int(kill_epoch) and batch_idx == int(kill_batch):
                os.kill(os.getpid(), signal.SIGKILL)

    overrides = [*sys.argv[9:], f"train.epochs={epochs}", f"data.num_workers={workers}"]
    recipe = load_recipe("unet", overrides)
    train(recipe, data, out=out, name=name, resume=resume == "1", overrides=overrides, progress=False,
          callbacks=[KillAt()])
''')


def train_process(data: Path, out: Path, name: str, epochs: int = 3, kill: tuple[int, int] = (-1, -1),
                  resume: bool = False, workers: int = 0) -> subprocess.CompletedProcess:
    args = [str(data), str(out), name, str(epochs), str(kill[0]), str(kill[1]), "1" if resume else "0", str(workers)]
    return subprocess.run([sys.executable, "-c", TRAIN, *args, *TINY[:-2]], capture_output=True, text=True,
                          timeout=600)


def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as stream:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(stream)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 1])
def test_kill_9_in_epoch_2_then_resume_equals_the_uninterrupted_run(phantom, tmp_path, workers):
    whole = train_process(phantom, tmp_path, "whole", workers=workers)
    assert whole.returncode == 0, whole.stderr
    killed = train_process(phantom, tmp_path, "cut", kill=(1, 2), workers=workers)
    assert killed.returncode == KILLED, killed.stderr
    assert (tmp_path / "cut" / "checkpoints" / "last.ckpt").is_file() and not (tmp_path / "cut" / "model").exists()
    resumed = train_process(phantom, tmp_path, "cut", resume=True, workers=workers)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert metric_rows(tmp_path / "cut") == metric_rows(tmp_path / "whole")
    assert len(metric_rows(tmp_path / "whole")) == 3
    cut, full = weights(tmp_path / "cut"), weights(tmp_path / "whole")
    assert cut.keys() == full.keys() and all(torch.equal(cut[k], full[k]) for k in full)
