"""`medseg study` end to end on real data: a tiny study (2 models x 2 seeds x 2 folds, 24 Kvasir-SEG images in
12 patients, 64 px, 1 epoch, one extra test set), its outputs, the Ray executor, and kill / resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from medseg.data.folds import groups_of
from medseg.engine.study import plan_study, read_study, run_study
from medseg.errors import MedsegError

MODELS = ["unet", "anunet"]
RUN_SECONDS = 600


def shrink(kvasir: Path, stems: list[str], root: Path, name_of) -> Path:
    """A copy of the `stems` of Kvasir-SEG at 96 px (faster to decode), renamed by `name_of(index, stem)`."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index, stem in enumerate(stems):
        new = name_of(index, stem)
        image = Image.open(kvasir / "images" / f"{stem}.jpg").convert("RGB").resize((96, 96))
        image.save(root / "images" / f"{new}.png")
        mask = Image.open(kvasir / "masks" / f"{stem}.png").convert("L").resize((96, 96), Image.NEAREST)
        mask.save(root / "masks" / f"{new}.png")
    return root


@pytest.fixture(scope="module")
def study_file(kvasir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images as 12 patients of two slices each (stems p03_<id>), 8 other images as the extra test set, and
    the study file that names them (relative paths)."""
    base = tmp_path_factory.mktemp("study")
    stems = sorted(p.stem for p in (kvasir / "images").glob("*.jpg"))
    shrink(kvasir, stems[:24], base / "polyps", lambda i, stem: f"p{i // 2:02d}_{stem[:8]}")
    shrink(kvasir, stems[24:32], base / "polyps-extra", lambda i, stem: stem[:8])
    study = {
        "name": "tiny", "description": "two models, two seeds, two grouped folds",
        "data": {"train": "polyps", "test": ["polyps-extra"]},
        "set": {"data.size": 64, "train.epochs": 1, "train.batch_size": 4, "data.augment": []},
        "models": [{"recipe": "unet", "set": {"model.base_channels": 8}},
                   {"recipe": "anunet", "set": {"train.batch_size": 2}}],
        "seeds": [0, 1], "folds": 2, "groups": "^(?P<group>p\\d+)_", "reference": "unet", "protocol": "paper",
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture(scope="module")
def local_study(study_file: Path) -> Path:
    lines: list[str] = []
    folder = run_study(study_file, study_file.parent / "out-local", report=lines.append, threads=1).folder
    assert "8 cells in 8 runs, 8 runs to do" in lines[0]
    assert "8/8 cells done" in lines[-1]
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_results_have_one_row_per_cell_dataset_and_case(local_study: Path):
    rows = read_csv(local_study / "results.csv")
    assert list(rows[0])[:5] == ["model", "dataset", "seed", "fold", "case"]
    assert {"dice", "iou"} <= set(rows[0])
    cells = {(r["model"], r["seed"], r["fold"]) for r in rows}
    assert cells == {(m, s, f) for m in MODELS for s in "01" for f in "01"}
    for model in MODELS:
        for seed in "01":
            own = [r for r in rows if r["model"] == model and r["seed"] == seed and r["dataset"] == "polyps"]
            assert sorted(r["case"] for r in own) == sorted(p.stem for p in (local_study.parents[1] / "polyps" /
                                                                            "images").glob("*.png"))
            extra = [r for r in rows if r["model"] == model and r["seed"] == seed and r["dataset"] == "polyps-extra"]
            assert len(extra) == 2 * 8  # both folds score the whole extra set


def test_folds_are_grouped_and_identical_across_models(local_study: Path):
    runs = json.loads((local_study / "study.json").read_text())["runs"]
    assert len(runs) == 8
    # every model sees the RGB images as they are, ANU-Net's gray-CT recipe included
    assert {job["recipe"]["model"]["in_channels"] for job in runs.values()} == {3}
    splits = {}
    for name, job in runs.items():
        stored = json.loads((local_study / "runs" / name / "splits.json").read_text())
        assert stored == job["splits"]
        model, seed, fold = name.split("-")[0], name.split("-s")[1][0], name.split("-f")[1][0]
        splits[(model, seed, fold)] = stored
    for seed in "01":
        for fold in "01":
            assert splits[("unet", seed, fold)] == splits[("anunet", seed, fold)]
            assert splits[("unet", seed, fold)] == splits[("unet", "0", fold)]
    tests = [splits[("unet", "0", f)]["test"] for f in "01"]
    assert not set(tests[0]) & set(tests[1]) and len(tests[0]) + len(tests[1]) == 24
    for fold in "01":
        parts = splits[("unet", "0", fold)]
        groups = {name: {g for g in groups_of(parts[name], "^(p\\d+)_").values()} for name in parts}
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"] and parts["val"]


def test_summary_is_the_mean_and_std_over_cells_of_the_cell_means(local_study: Path):
    rows = read_csv(local_study / "results.csv")
    summary = read_csv(local_study / "summary.csv")
    assert list(summary[0]) == ["model", "dataset", "metric", "mean", "std", "n"]
    entry = next(s for s in summary if s["model"] == "anunet" and s["dataset"] == "polyps" and s["metric"] == "dice")
    means = []
    for seed in "01":
        for fold in "01":
            values = [float(r["dice"]) for r in rows if r["model"] == "anunet" and r["dataset"] == "polyps"
                      and r["seed"] == seed and r["fold"] == fold]
            means.append(sum(values) / len(values))
    mean = sum(means) / 4
    assert float(entry["mean"]) == pytest.approx(mean)
    assert float(entry["std"]) == pytest.approx((sum((m - mean) ** 2 for m in means) / 4) ** 0.5)
    assert entry["n"] == "4"
    assert {(s["model"], s["dataset"]) for s in summary} == {(m, d) for m in MODELS for d in ("polyps",
                                                                                             "polyps-extra")}


def test_report_tests_plots_and_states(local_study: Path):
    report = (local_study / "report.md").read_text()
    assert "## polyps" in report and "## polyps-extra" in report
    assert "Wilcoxon signed-rank" in report and "Holm" in report
    assert "| unet | 4 |" in report and "| anunet | 4 |" in report and "(reference)" in report
    assert "GFLOPs" in report and "Missing cells" not in report
    tests = read_csv(local_study / "tests.csv")
    assert {(t["dataset"], t["model"], t["reference"]) for t in tests} == {("polyps", "anunet", "unet"),
                                                                          ("polyps-extra", "anunet", "unet")}
    assert all(int(t["n_pairs"]) == (48 if t["dataset"] == "polyps" else 32) for t in tests)
    pictures = sorted(p.name for p in (local_study / "plots").iterdir())
    assert pictures == ["box_polyps-extra_dice.png", "box_polyps_dice.png", "efficiency_polyps-extra.png",
                        "efficiency_polyps.png"]
    assert all((local_study / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pictures)
    record = json.loads((local_study / "study.json").read_text())
    assert {c["state"] for c in record["cells"]} == {"done"}
    costs = json.loads((local_study / "costs.json").read_text())
    assert len(costs) == 2 and all(c["params"] > 0 and c["gflops"] > 0 for c in costs.values())


def test_a_rerun_of_a_finished_study_only_reaggregates(local_study: Path, study_file: Path):
    before = {p: p.stat().st_mtime_ns for p in (local_study / "runs").rglob("*") if p.is_file()}
    lines: list[str] = []
    run_study(study_file, study_file.parent / "out-local", report=lines.append, threads=1)
    assert "0 runs to do" in lines[0]
    assert before == {p: p.stat().st_mtime_ns for p in (local_study / "runs").rglob("*") if p.is_file()}
    summary = (local_study / "summary.csv").read_bytes()
    (local_study / "summary.csv").unlink()
    again = subprocess.run([sys.executable, "-m", "medseg.cli", "study", "--report", str(local_study)],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert again.returncode == 0, again.stderr
    assert str(local_study / "report.md") in again.stdout
    assert (local_study / "summary.csv").read_bytes() == summary


def test_dry_run_shows_states_and_a_changed_study_makes_new_cells(local_study: Path, study_file: Path):
    lines: list[str] = []
    run_study(study_file, study_file.parent / "out-local", dry_run=True, report=lines.append)
    assert sum(" done " in line for line in lines) == 8
    assert lines[-1].startswith("8 cells in 8 runs; 8 done;")
    changed = yaml.safe_load(study_file.read_text())
    changed["set"]["train.epochs"] = 2
    other = study_file.with_name("tiny-2epochs.yaml")
    other.write_text(yaml.safe_dump(changed))
    study, base = read_study(other)
    plan = plan_study(study, base, study_file.parent / "out-local")
    assert {c.state for c in plan.cells} == {"new"}
    old = json.loads((local_study / "study.json").read_text())["runs"]
    assert not set(plan.jobs) & set(old)
    # settings that change speed or logging, not learning, keep the runs
    faster = yaml.safe_load(study_file.read_text())
    faster["set"].update({"data.num_workers": 0, "data.cache": False, "train.loggers": ["csv", "tensorboard"]})
    other.write_text(yaml.safe_dump(faster))
    study, base = read_study(other)
    assert {c.state for c in plan_study(study, base, study_file.parent / "out-local").cells} == {"done"}


@pytest.mark.parametrize(("change", "message"), [
    ({"groups": "^(?P<group>q\\d+)_"}, r"finds no group in stem"),
    ({"folds": 13}, r"k=13 folds need at least 13 groups; the 24 stems form only 12"),
    ({"reference": "segnet"}, r"reference 'segnet' is not one of its models"),
    ({"models": [{"recipe": "unet"}, {"recipe": "unet"}]}, r"the models \['unet'\] appear twice"),
    ({"folds": 1}, r"study .*bad.yaml: folds: Input should be greater than or equal to 2"),
    ({"seed": [0]}, r"study .*bad.yaml: seed: Extra inputs are not permitted"),
    ({"data": {"train": "polyps", "test": ["elsewhere/polyps"]}}, r"two of its data folders are named 'polyps'"),
])
def test_bad_studies_are_refused_in_one_line(study_file: Path, tmp_path: Path, change, message):
    (tmp_path / "elsewhere" / "polyps").mkdir(parents=True)
    (tmp_path / "polyps").symlink_to(study_file.parent / "polyps")
    raw = {**yaml.safe_load(study_file.read_text()), "data": {"train": "polyps"}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MedsegError, match=message) as excinfo:
        run_study(path, tmp_path / "out", report=lambda line: None)
    assert "\n" not in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_ray_gives_the_same_scores(local_study: Path, study_file: Path):
    """The U-Net cells of one seed through Ray: per-case scores byte-identical to the local executor's."""
    pytest.importorskip("ray", reason="the ray extra is part of the test install (pip install 'medseg[ray]')")
    raw = yaml.safe_load(study_file.read_text())
    raw.update(seeds=[0], models=raw["models"][:1])
    path = study_file.with_name("tiny-ray.yaml")
    path.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    folder = run_study(path, study_file.parent / "out-ray", executor="ray", report=lines.append, threads=1).folder
    assert "2/2 cells done" in lines[-1]
    scores = sorted((folder / "cells").glob("*.csv"))
    assert len(scores) == 2
    for cell in scores:
        assert cell.read_bytes() == (local_study / "cells" / cell.name).read_bytes()


def test_killing_a_study_mid_run_and_rerunning_finishes_only_what_was_missing(study_file: Path):
    out = study_file.parent / "out-kill"
    raw = yaml.safe_load(study_file.read_text())
    raw["set"]["train.epochs"] = 2  # a checkpoint after epoch 1 to resume from
    raw.update(seeds=[0], models=raw["models"][:1])  # the U-Net's two folds: one finishes, one is killed
    path = study_file.with_name("tiny-kill.yaml")
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "medseg.cli", "study", str(path), "--out", str(out), "--threads", "1"]
    study = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    folder = out / "tiny"
    deadline = time.monotonic() + RUN_SECONDS
    partial = None
    while time.monotonic() < deadline and partial is None and study.poll() is None:
        cells = list((folder / "cells").glob("*.csv"))
        checkpoints = [p for p in (folder / "runs").glob("*/checkpoints/last.ckpt")
                       if not (p.parents[1] / "model" / "config.json").exists()]
        if cells and checkpoints:
            partial = checkpoints[0].parents[1]
        time.sleep(0.02)
    assert partial is not None, study.stderr.read().decode() if study.poll() is not None else "timed out"
    study.send_signal(signal.SIGKILL)
    study.wait()
    time.sleep(1.0)  # the run's process dies with the study (PR_SET_PDEATHSIG)
    finished = {p: p.stat().st_mtime_ns for p in (folder / "cells").glob("*.csv")}
    trained = [p.parents[1] for p in (folder / "runs").glob("*/model/config.json")]
    assert trained and partial not in trained

    lines: list[str] = []
    run_study(path, out, report=lines.append, threads=1)
    assert f"2 cells in 2 runs, {2 - len(finished)} runs to do" in lines[0]
    assert "2/2 cells done" in lines[-1]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    resumed = yaml.safe_load((partial / "config.yaml").read_text())["run"]
    assert len(resumed.get("resumed", [])) == 1
    for run in trained:
        assert "resumed" not in yaml.safe_load((run / "config.yaml").read_text())["run"]

    again: list[str] = []
    run_study(path, out, report=again.append, threads=1)
    assert "0 runs to do" in again[0]


def test_the_shipped_studies_plan_on_real_data(kvasir: Path, tmp_path: Path):
    from medseg.engine.study import list_studies

    assert {"anunet-table2", "m2snet-table1", "m2snet-table2", "m2snet-table3", "m2snet-table4", "stsnet-table1",
            "stsnet-table6", "stsnet-table9", "focusnet-table1", "focusnet-table2", "fovea-table2", "fovea-table3",
            "fovea-table4", "fovea-table5"} <= set(list_studies())
    for name in list_studies():
        study, base = read_study(name, data=[str(kvasir)], cpu=True)
        plan = plan_study(study, base, tmp_path)
        assert plan.cells and {c.state for c in plan.cells} == {"new"}
        assert plan.reference in {c.model for c in plan.cells}


def test_the_command_line_lists_and_refuses_in_one_line(tmp_path: Path):
    listed = subprocess.run([sys.executable, "-m", "medseg.cli", "study", "--list"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert listed.returncode == 0 and "anunet-table2" in listed.stdout
    refused = subprocess.run([sys.executable, "-m", "medseg.cli", "study", "no-such-study"], capture_output=True,
                             text=True, env={**os.environ, "COLUMNS": "200"})
    assert refused.returncode == 2
    assert "unknown study 'no-such-study'" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr


def test_a_failing_run_is_reported_with_its_log_and_the_others_go_on(study_file: Path, tmp_path: Path):
    raw = yaml.safe_load(study_file.read_text())
    raw.update(name="failing", seeds=[0], data={"train": str(study_file.parent / "polyps")},
               models=[{"recipe": "unet", "set": {"model.base_channels": 8}},
                       {"recipe": "unet", "name": "unet-60px", "set": {"model.base_channels": 8, "data.size": 60}}])
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    listed = subprocess.run([sys.executable, "-m", "medseg.cli", "study", str(path), "--out", str(out), "--threads",
                             "1"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert listed.returncode == 1, listed.stderr
    failures = [line for line in listed.stdout.splitlines() if "FAILED" in line]
    assert len(failures) == 2 and all("60" in line and "log " in line for line in failures)
    assert "2/4 cells done" in listed.stdout and "2 run(s) failed" in listed.stdout
    report = (out / "failing" / "report.md").read_text()
    assert "## Missing cells" in report
    assert sorted(line.split()[1] for line in report.splitlines() if line.startswith("- unet-60px")) == [
        "unet-60px-polyps-s0-f0", "unet-60px-polyps-s0-f1"]
    record = json.loads((out / "failing" / "study.json").read_text())
    states = {c["id"]: c["state"] for c in record["cells"]}
    assert states == {"unet-polyps-s0-f0": "done", "unet-polyps-s0-f1": "done", "unet-60px-polyps-s0-f0": "failed",
                      "unet-60px-polyps-s0-f1": "failed"}
    assert all(Path(c["error"]).is_file() for c in record["cells"] if c["state"] == "failed")


def test_several_training_datasets_are_one_study_each(study_file: Path, tmp_path: Path):
    first = study_file.parent / "polyps"
    second = tmp_path / "polyps-b"
    second.mkdir()
    for sub in ("images", "masks"):
        (second / sub).symlink_to(first / sub)
    raw = yaml.safe_load(study_file.read_text())
    raw.update(name="two", seeds=[0], folds=None, data={"train": [str(first), str(second)]},
               models=[{"recipe": "unet", "set": {"model.base_channels": 8}}], reference=None)
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    plan = run_study(path, tmp_path / "out", report=lines.append, threads=1)
    assert "2/2 cells done" in lines[-1]
    for name in ("polyps", "polyps-b"):
        summary = read_csv(plan.folder / name / "summary.csv")
        assert {s["dataset"] for s in summary} == {name}
        assert f"trained on {name}" in (plan.folder / name / "report.md").read_text()
    assert not (plan.folder / "summary.csv").exists()
