"""Two-stage training in a study (`init_from`): planning (each second-stage run starts from the first stage's run
of the same seed and fold, and its hash follows the first stage), the refusals, and execution on the phantom set
(the second stage trains from the first's model, after it; a failed first stage leaves it not started)."""

import json
from pathlib import Path

import pytest
import yaml

from medseg.engine.study import plan_study, read_study, run_study
from medseg.errors import MedsegError

TINY = {"data.size": 64, "train.epochs": 1, "train.batch_size": 4, "data.augment": [], "model.base_channels": 8}


def write_study(folder: Path, data: Path, models: list[dict], **extra) -> Path:
    raw = {"name": "chain", "data": {"train": str(data)}, "set": TINY, "models": models, "seeds": [0],
           "protocol": "paper", **extra}
    path = folder / "chain.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def plan(path: Path, out: Path):
    study, base = read_study(path)
    return plan_study(study, base, out)


# the second stage first: rows may come in any order
CHAIN = [{"recipe": "unet", "name": "second", "init_from": "first"},
         {"recipe": "unet", "name": "first"},
         {"recipe": "unet", "name": "plain", "set": {"model.base_channels": 4}}]


def test_each_second_stage_run_starts_from_the_first_stage_run_of_its_seed_and_fold(phantom: Path, tmp_path: Path):
    planned = plan(write_study(tmp_path, phantom, CHAIN, seeds=[0, 1], folds=2), tmp_path / "out")
    assert [c.model for c in planned.cells[::4]] == ["second", "first", "plain"]  # cells keep the file's order
    firsts = {(c.seed, c.fold): c.run for c in planned.cells if c.model == "first"}
    seconds = [c for c in planned.cells if c.model == "second"]
    assert len(seconds) == 4 and len(set(firsts.values())) == 4
    for cell in seconds:
        job = planned.jobs[cell.run]
        assert job.needs == [firsts[(cell.seed, cell.fold)]]
        expected = (tmp_path / "out" / "chain" / "runs" / job.needs[0] / "model" / "model.safetensors").resolve()
        assert job.recipe["model"]["weights"] == str(expected)
        assert job.splits == planned.jobs[job.needs[0]].splits
    for cell in planned.cells:
        if cell.model != "second":
            assert planned.jobs[cell.run].needs == [] and planned.jobs[cell.run].recipe["model"]["weights"] is None


def test_a_changed_first_stage_makes_new_second_stage_runs(phantom: Path, tmp_path: Path):
    before = plan(write_study(tmp_path, phantom, CHAIN), tmp_path / "out")
    changed = [dict(CHAIN[0]), {**CHAIN[1], "set": {"train.epochs": 2}}, CHAIN[2]]
    after = plan(write_study(tmp_path, phantom, changed), tmp_path / "out")
    runs = {(c.model, c.run) for c in before.cells}
    new = {(c.model, c.run) for c in after.cells}
    assert {m for m, _ in runs - new} == {"first", "second"}  # the plain row keeps its run
    # a study folder elsewhere keeps its run names (the hash takes the first stage's path inside the study)
    moved = plan(write_study(tmp_path, phantom, CHAIN), tmp_path / "elsewhere")
    assert {(c.model, c.run) for c in moved.cells} == runs
    assert str(tmp_path / "elsewhere") in moved.jobs[moved.cells[0].run].recipe["model"]["weights"]


@pytest.mark.parametrize(("models", "message"), [
    ([{"recipe": "unet"}, {"recipe": "unet", "name": "b", "init_from": "nowhere"}],
     r"model 'b' has init_from 'nowhere', which is not one of its models \['unet', 'b'\]"),
    ([{"recipe": "unet", "name": "a", "init_from": "a"}], r"model 'a' has init_from 'a', itself"),
    ([{"recipe": "unet", "name": "a", "init_from": "c"}, {"recipe": "unet", "name": "b", "init_from": "a"},
      {"recipe": "unet", "name": "c", "init_from": "b"}], r"start from each other in a cycle: a -> c -> b -> a"),
    ([{"recipe": "anunet", "name": "a-L3", "level": 3}, {"recipe": "anunet", "name": "b", "init_from": "a-L3"}],
     r"model 'b' starts from 'a-L3', a pruning-level variant"),
    ([{"recipe": "unet", "name": "a"}, {"recipe": "unet", "name": "b", "init_from": "a",
                                       "set": {"model.weights": "/some/file.safetensors"}}],
     r"model 'b' sets model.weights and init_from 'a'; give one of them"),
])
def test_bad_chains_are_refused_in_one_line(phantom: Path, tmp_path: Path, models, message):
    with pytest.raises(MedsegError, match=message) as excinfo:
        run_study(write_study(tmp_path, phantom, models), tmp_path / "out", report=lambda line: None)
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_the_second_stage_trains_from_the_first_stage_model(phantom: Path, tmp_path: Path):
    path = write_study(tmp_path, phantom, CHAIN[:2])
    lines: list[str] = []
    planned = run_study(path, tmp_path / "out", report=lines.append, threads=1, jobs=2)
    assert "2/2 cells done" in lines[-1]
    first, second = (next(c.run for c in planned.cells if c.model == m) for m in ("first", "second"))
    finished = [line.split(":")[0] for line in lines if line.endswith(": done")]
    assert finished == [first, second]  # one per wave, though two may run at once
    model_file = planned.folder.resolve() / "runs" / first / "model" / "model.safetensors"
    config = yaml.safe_load((planned.folder / "runs" / second / "config.yaml").read_text())
    assert config["model"]["weights"] == str(model_file)
    loads = config["run"]["weights"]
    assert len(loads) == 1 and loads[0]["file"] == str(model_file) and loads[0]["loaded"] > 0
    assert yaml.safe_load((planned.folder / "runs" / first / "config.yaml").read_text())["run"]["weights"] == []

    dry: list[str] = []
    run_study(path, tmp_path / "out", dry_run=True, report=dry.append)
    assert any(line.startswith("second-") and f"run {second} from {first} " in line for line in dry)
    again: list[str] = []
    run_study(path, tmp_path / "out", report=again.append, threads=1)
    assert "0 runs to do" in again[0]


def test_a_failed_first_stage_leaves_its_second_stage_not_started(phantom: Path, tmp_path: Path):
    models = [{"recipe": "unet", "name": "first", "set": {"data.size": 60}},  # U-Net needs a multiple of 16
              {"recipe": "unet", "name": "second", "init_from": "first", "set": {"data.size": 64}},
              {"recipe": "unet", "name": "plain", "set": {"model.base_channels": 4}}]
    lines: list[str] = []
    path = write_study(tmp_path, phantom, models, reference="plain")
    planned = run_study(path, tmp_path / "out", report=lines.append, threads=1)
    first, second = (next(c.run for c in planned.cells if c.model == m) for m in ("first", "second"))
    assert any(line.startswith(f"{first}: FAILED") for line in lines)
    log = planned.folder / "logs" / f"{first}.log"
    reason = f"not started: it starts from run {first}, which failed (log {log})"
    assert f"{second}: NOT STARTED: it starts from run {first}, which failed (log {log})" in lines
    assert "1/3 cells done" in lines[-1] and "2 run(s) failed" in lines[-1]
    assert not (planned.folder / "runs" / second).exists() and not (planned.folder / "logs" / f"{second}.log").exists()
    record = json.loads((planned.folder / "study.json").read_text())
    cells = {c["model"]: c for c in record["cells"]}
    assert cells["second"]["state"] == "failed" and cells["second"]["error"] == reason
    assert cells["first"]["error"] == str(log) and cells["plain"]["state"] == "done"
    assert f"- {cells['second']['id']} (failed, {reason})" in (planned.folder / "report.md").read_text()
