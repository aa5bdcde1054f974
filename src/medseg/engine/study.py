"""`medseg study`: a paper's comparison table as one command — models x training datasets x seeds x folds, each
cell trained as an ordinary run, scored on its held-out cases and on extra test datasets, then aggregated with
paired statistics (`medseg.engine.study_report`).

A study file (YAML, validated by `StudyFile`):

    name: polyp-cpu
    data: {train: DATA, test: [OTHER, ...]}   # paths relative to the study file; `--data` / `--test` override
    set: {data.size: 128, train.epochs: 10}   # overrides for every model
    models: [{recipe: unet}, {recipe: anunet, name: anunet-L3, level: 3, set: {...}},
             {recipe: ehformer_stage1, name: stage1}, {recipe: ehformer, init_from: stage1}]
    seeds: [0, 1, 2]
    folds: 5                 # grouped k-fold on data.train; omit for one fixed held-out split
    groups: '^(?P<group>[^_]+)_'   # the patient / volume id in a file stem: no group in two folds (default:
                             # a `medseg slices` folder by volume, any other folder stem by stem)
    reference: unet          # every model is compared with this one (default: the first)
    protocol: paper          # one metric protocol for every model (default: the reference recipe's)
    cpu: {set: {...}, seeds: [0], folds: 3}   # what `--cpu` changes, for a laptop

Choices (ours): every cell of a training dataset gets the same splits — the k folds of `medseg.data.folds`
(validation carved from each training fold by whole groups), or, without `folds`, the folder's own
splits.json when it has one, else the first of five grouped folds as a fixed 20 % test set. A cell's run
folder is named by a hash of everything that shapes its training (resolved recipe, data folder, splits), so
a change in the study file makes a new run, never a silent reuse; a cell's scores are keyed by a hash of its
run, pruning level, protocol and extra test sets, so a new test set scores again without training. Models
that differ only in the evaluated pruning level share one run. The unit of work is a run (train, then
evaluate every cell that uses it): a finished run is never trained again, a killed one resumes from its
last checkpoint, and a re-run of a finished study only re-aggregates. Each run executes in its own process
(`python -m medseg.engine.study`), with its console output in `OUT/<name>/logs/`, so a failing run is
reported with its log and the others go on; `--jobs N` runs N at once, `--executor ray` submits each as a
Ray task. Every run gets the same number of CPU threads (`--threads`) under either executor, so local and
Ray results agree to the last digit.

Two-stage training (`init_from: ROW`, another row of the study): for each training dataset, seed and fold the
row's recipe gets `model.weights` = that row's run's `model/model.safetensors` (the same dataset, seed and
fold), so its run starts after that one, in the next wave of runs; a first stage that failed leaves its second
stage not started, marked failed with the reason. The first stage's run name (which carries its hash) is part of
the second stage's hash, so a new first stage makes a new second stage. Ours: the hash takes that file's path
within the study folder, so a moved study folder keeps its runs; the job's recipe has the absolute path.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from medseg.config import ProtocolName, Recipe, assign, read_recipe_yaml, validate_recipe
from medseg.data.folds import empty_mask_strata, fold_splits, split_groups
from medseg.data.formats import discover, load_case
from medseg.data.splits import make_splits
from medseg.engine.run import Run, now, slug
from medseg.engine.study_report import aggregate, read_results_csv, write_results_csv
from medseg.errors import MedsegError, user_message
from medseg.files import write_text_atomic
from medseg.metrics import get_protocol
from medseg.models.saving import WEIGHTS_NAME

HOLDOUT_FOLDS = 5  # without `folds`: the first of 5 grouped folds is the fixed test set (20 %)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StudyModel(Strict):
    recipe: str  # a built-in recipe name or a YAML file (relative to the study file)
    name: Optional[str] = None  # default: the recipe name (with -L<level> for a pruned variant)
    set: dict[str, Any] = Field(default_factory=dict)
    level: Optional[int] = Field(None, ge=1)  # evaluate this pruning level (ANU-Net L1..L4)
    init_from: Optional[str] = None  # another row: start each run from its run's model (same data, seed, fold)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


PathList = Annotated[list[str], BeforeValidator(_as_list)]  # one path, or a list of them


class StudyData(Strict):
    train: PathList = Field(default_factory=list)  # one study per training dataset
    test: PathList = Field(default_factory=list)  # scored whole by every cell


class CpuVariant(Strict):
    set: dict[str, Any] = Field(default_factory=dict)
    seeds: Optional[list[int]] = None
    folds: Optional[int] = None


class StudyFile(Strict):
    name: str
    description: str = ""
    data: StudyData = Field(default_factory=StudyData)
    set: dict[str, Any] = Field(default_factory=dict)
    models: list[StudyModel] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    folds: Optional[int] = Field(None, ge=2)
    groups: Optional[str] = None
    val: float = Field(0.1, gt=0, lt=1)  # validation fraction carved from each training fold
    split_seed: int = 0  # the seed of the folds (the same for every model and seed)
    reference: Optional[str] = None
    protocol: Optional[ProtocolName] = None  # type: ignore[valid-type]
    cpu: Optional[CpuVariant] = None


@dataclass
class Cell:
    """One (model, training dataset, seed, fold): evaluated from the run `run` (shared by pruning levels)."""

    id: str
    model: str
    dataset: str
    seed: int
    fold: Optional[int]
    level: Optional[int]
    run: str
    results: str  # file name of its per-case scores in OUT/<name>/cells/, keyed by all that shapes them
    state: str = "new"
    error: Optional[str] = None


@dataclass
class Job:
    """One run: its training recipe and splits, and the evaluations of every cell that uses it."""

    run: str
    recipe: dict[str, Any]
    data: str
    splits: dict[str, list[str]]
    splits_source: str
    tests: list[str]
    protocol: str
    levels: list[Optional[int]]
    cells: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)  # the runs it starts from (init_from), to finish first


@dataclass
class Plan:
    study: StudyFile
    folder: Path
    cells: list[Cell]
    jobs: dict[str, Job]
    reference: str
    protocol: str

    @property
    def log_dir(self) -> Path:
        return self.folder / "logs"


def list_studies() -> list[str]:
    folder = resources.files("medseg") / "studies"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_study(name_or_path: str | Path, data: Optional[list[str]] = None, tests: Optional[list[str]] = None,
               cpu: bool = False) -> tuple[StudyFile, Path]:
    """(the study, the folder its relative paths are read from) for a shipped name or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise MedsegError(f"study file {path} does not exist; give a YAML file or a shipped study "
                              f"({', '.join(list_studies())})")
        text, base = path.read_text(), path.resolve().parent
    else:
        resource = resources.files("medseg") / "studies" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise MedsegError(f"unknown study {name_or_path!r}; shipped studies: {', '.join(list_studies())} "
                              "(or give a YAML file)")
        text, base = resource.read_text(), Path.cwd()
    try:
        raw = yaml.safe_load(text) or {}
        study = StudyFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise MedsegError(f"study {name_or_path}: invalid YAML: {exc}".replace("\n", " ")) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise MedsegError(f"study {name_or_path}: {where}: {first['msg']}") from None
    updates: dict[str, Any] = {}
    if data:
        updates["data"] = study.data.model_copy(update={"train": [str(Path(d).resolve()) for d in data]})
    if tests:
        current = updates.get("data", study.data)
        updates["data"] = current.model_copy(update={"test": [str(Path(t).resolve()) for t in tests]})
    if cpu:
        if study.cpu is None:
            raise MedsegError(f"study {study.name} has no cpu variant; drop --cpu or add a `cpu:` section")
        updates["set"] = {**study.set, **study.cpu.set}
        updates["seeds"] = study.cpu.seeds or study.seeds
        updates["folds"] = study.cpu.folds or study.folds
        updates["name"] = f"{study.name}-cpu"
    study = study.model_copy(update=updates)
    if not study.data.train:
        raise MedsegError(f"study {study.name} names no training data; give --data DATA")
    return study, base


def model_names(study: StudyFile) -> list[str]:
    names = [m.name or (Path(m.recipe).stem + (f"-L{m.level}" if m.level else "")) for m in study.models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise MedsegError(f"study {study.name}: the models {duplicates} appear twice; give each a `name`")
    return names


def chain_order(study: StudyFile, names: list[str]) -> list[int]:
    """The indices of the study's rows, each after the row it starts from (`init_from`), otherwise in file order;
    an unknown row, a row starting from itself or a pruning-level variant, and a cycle are refused in one line."""
    index = {name: i for i, name in enumerate(names)}
    for model, name in zip(study.models, names):
        first = model.init_from
        if first is None:
            continue
        if first == name:
            raise MedsegError(f"study {study.name}: model {name!r} has init_from {first!r}, itself; name the row "
                              "of its first stage")
        if first not in index:
            raise MedsegError(f"study {study.name}: model {name!r} has init_from {first!r}, which is not one of "
                              f"its models {names}")
        if study.models[index[first]].level is not None:
            raise MedsegError(f"study {study.name}: model {name!r} starts from {first!r}, a pruning-level variant "
                              "(scored pruned, trained whole); name the row that trains that network")
    depth: dict[str, int] = {}
    for name in names:
        chain = [name]
        while study.models[index[chain[-1]]].init_from is not None:
            chain.append(study.models[index[chain[-1]]].init_from)  # type: ignore[arg-type]
            if chain[-1] in chain[:-1]:
                raise MedsegError(f"study {study.name}: the models start from each other in a cycle: "
                                  f"{' -> '.join(chain)}")
        depth[name] = len(chain) - 1
    return sorted(range(len(names)), key=lambda i: depth[names[i]])  # stable: file order within a depth


def resolve_recipe(model: StudyModel, study: StudyFile, base: Path, seed: int,
                   data_defaults: Optional[dict[str, Any]] = None) -> Recipe:
    """The model's recipe with the data's defaults (`data_channels`), the study's overrides, then the model's
    own, then the seed."""
    source = model.recipe if not model.recipe.endswith((".yaml", ".yml")) else str((base / model.recipe).resolve())
    name, raw = read_recipe_yaml(source)
    for key, value in {**(data_defaults or {}), **study.set, **model.set, "train.seed": seed}.items():
        assign(raw, key, value)
    return validate_recipe(name, raw)


def _resolve_path(text: str, base: Path) -> Path:
    path = Path(text)
    path = path if path.is_absolute() else (base / path)
    if not path.is_dir():
        raise MedsegError(f"data folder {path} does not exist; check the study's data paths (relative to the study "
                          "file) or give --data")
    return path.resolve()


def data_channels(data: Path) -> dict[str, Any]:
    """{"model.in_channels": 1 or 3} from the folder's first image: every model of a study sees the data as it
    is (ours: the recipes' own in_channels differ, e.g. ANU-Net's gray CT against U-Net's RGB, and a table whose
    rows saw different inputs compares nothing); a study's or model's `set` still wins."""
    layout = discover(data)
    if not layout.cases:
        raise MedsegError(f"{data} has no image/mask pairs; run `medseg check-data {data}`")
    channels = load_case(layout.cases[0], reduce_to=(64, 64)).shape[2]
    return {"model.in_channels": channels} if channels in (1, 3) else {}


def dataset_splits(study: StudyFile, data: Path, recipe: Recipe) -> list[tuple[Optional[int], dict, str]]:
    """[(fold or None, splits, source)], the same for every model of the study."""
    layout = discover(data)
    stems = sorted(c.stem for c in layout.cases)
    if study.folds is None and (data / "splits.json").is_file():
        return [(None, *make_splits(layout, study.val, 0.2, study.split_seed))]
    # `groups` unset: a `medseg slices` folder is grouped by volume, as a run's default split is
    all_groups, grouped_by = split_groups(layout, study.groups or None)
    if study.folds is None and layout.test_cases:
        splits, source = make_splits(layout, study.val, 0.2, study.split_seed, all_groups, grouped_by)
        return [(None, splits, source)]
    groups = {s: all_groups[s] for s in stems} if all_groups is not None else None
    by = f", {grouped_by}" if groups is not None else ""
    strata = empty_mask_strata(layout, stems, recipe.model.num_classes, recipe.data.mask_threshold)
    k = study.folds or HOLDOUT_FOLDS
    splits = fold_splits(stems, k, groups=groups, strata=strata, seed=study.split_seed, val_fraction=study.val)
    if study.folds is None:
        return [(None, splits[0], f"study {study.name}: held-out grouped fold 1 of {HOLDOUT_FOLDS}{by}")]
    return [(i, s, f"study {study.name}: fold {i + 1} of {k}{by}") for i, s in enumerate(splits)]


# recipe keys that change how fast a run trains or what it logs, not what it learns: left out of a run's hash, so
# that a new such setting (the decoded-data cache, say) does not make a finished study train again
NOT_SHAPING = (("data", "cache"), ("data", "num_workers"), ("train", "loggers"))


def shaping(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe without the keys of `NOT_SHAPING`: what a run's hash is made of."""
    raw = recipe.to_dict()
    for section, key in NOT_SHAPING:
        raw.get(section, {}).pop(key, None)
    return raw


def plan_study(study: StudyFile, base: Path, out: Path) -> Plan:
    """Every cell and run of the study, with each cell's state from what is on disk."""
    names = model_names(study)
    reference = study.reference or names[0]
    if reference not in names:
        raise MedsegError(f"study {study.name}: reference {reference!r} is not one of its models {names}")
    folder = out / slug(study.name)
    protocol = study.protocol or resolve_recipe(study.models[names.index(reference)], study, base,
                                                study.seeds[0]).eval.protocol
    tests = [str(_resolve_path(t, base)) for t in study.data.test]
    cells: list[Cell] = []
    jobs: dict[str, Job] = {}
    run_of: dict[str, str] = {}  # training hash -> run name
    trained_on = [_resolve_path(text, base) for text in study.data.train]
    labels = [d.name for d in trained_on] + [Path(t).name for t in tests]
    clashes = sorted({label for label in labels if labels.count(label) > 1})
    if clashes:
        raise MedsegError(f"study {study.name}: two of its data folders are named {clashes[0]!r}; results are "
                          "labelled by folder name, so give each training and test dataset a folder name of its own")
    order = chain_order(study, names)
    for data in trained_on:
        defaults = data_channels(data)
        first = resolve_recipe(study.models[names.index(reference)], study, base, study.seeds[0], defaults)
        folds = dataset_splits(study, data, first)
        run_of_row: dict[tuple[str, int, Optional[int]], str] = {}  # (row, seed, fold) -> its run, for init_from
        for model, name in ((study.models[i], names[i]) for i in order):
            for seed in study.seeds:
                recipe = resolve_recipe(model, study, base, seed, defaults)
                if model.init_from is not None and recipe.model.weights is not None:
                    raise MedsegError(f"study {study.name}: model {name!r} sets model.weights and init_from "
                                      f"{model.init_from!r}; give one of them")
                for fold, splits, source in folds:
                    trained = shaping(recipe)
                    needs = []
                    if model.init_from is not None:
                        needs = [run_of_row[(model.init_from, seed, fold)]]
                        trained["model"]["weights"] = f"runs/{needs[0]}/model/{WEIGHTS_NAME}"  # in the study folder
                    key = hashlib.sha1(json.dumps({"recipe": trained, "data": str(data), "splits": splits},
                                                  sort_keys=True).encode()).hexdigest()[:8]
                    if key not in run_of:  # models that differ only in the evaluated level share one run
                        run_of[key] = (f"{slug(name if model.level is None else recipe.name)}-{slug(data.name)}"
                                       f"-s{seed}" + ("" if fold is None else f"-f{fold}") + f"-{key}")
                    run_name = run_of_row[(name, seed, fold)] = run_of[key]
                    if run_name not in jobs:
                        resolved = recipe.to_dict()
                        if needs:
                            first_model = Run(folder.resolve() / "runs" / needs[0]).model_dir
                            resolved["model"]["weights"] = str(first_model / WEIGHTS_NAME)
                        jobs[run_name] = Job(run_name, resolved, str(data), splits, source, tests, protocol, [],
                                             needs=needs)
                    job = jobs[run_name]
                    if model.level not in job.levels:
                        job.levels.append(model.level)
                    cell_id = f"{name}-{slug(data.name)}-s{seed}" + ("" if fold is None else f"-f{fold}")
                    job.cells.append(cell_id)
                    scored = hashlib.sha1(json.dumps([run_name, model.level, protocol, tests]).encode()).hexdigest()[:8]
                    cells.append(Cell(cell_id, name, data.name, seed, fold, model.level, run_name,
                                      f"{cell_id}-{scored}.csv"))
    datasets = [d.name for d in trained_on]
    cells.sort(key=lambda c: (datasets.index(c.dataset), names.index(c.model)))  # file order (stable: seeds, folds)
    plan = Plan(study, folder, cells, jobs, reference, protocol)
    for cell in cells:
        cell.state = cell_state(plan, cell)
    return plan


def cell_results(plan: Plan, cell: Cell) -> Path:
    return plan.folder / "cells" / cell.results


def run_path(plan: Plan, job: Job) -> Path:
    return plan.folder / "runs" / job.run


def cell_state(plan: Plan, cell: Cell) -> str:
    """done (scored), trained (model exported, not yet scored), partial (a checkpoint to resume), new."""
    if cell_results(plan, cell).is_file():
        return "done"
    run = Run(run_path(plan, plan.jobs[cell.run]))
    if (run.model_dir / "config.json").is_file():
        return "trained"
    if run.last_checkpoint.is_file():
        return "partial"
    return "new"


def estimate(plan: Plan, cell: Cell) -> int:
    """Images x epochs of the cell's training (its run's training split times the recipe's epochs)."""
    job = plan.jobs[cell.run]
    return len(job.splits["train"]) * int(job.recipe["train"]["epochs"])


def write_study_json(plan: Plan) -> None:
    record = {"study": plan.study.model_dump(mode="json"), "reference": plan.reference, "protocol": plan.protocol,
              "updated": now(), "cells": [asdict(c) for c in plan.cells],
              "runs": {name: asdict(job) for name, job in plan.jobs.items()}}
    write_text_atomic(plan.folder / "study.json", json.dumps(record, indent=1) + "\n")


# ---- one run, in its own process -------------------------------------------------------------------------

def execute_job(folder: Path, run_name: str) -> None:
    """Train (or resume, or skip when exported) one run of a planned study, then score its cells."""
    from medseg.config import recipe_from_dict
    from medseg.engine.evaluate import evaluate
    from medseg.engine.train import train

    record = json.loads((folder / "study.json").read_text())
    job = Job(**record["runs"][run_name])
    run = Run(folder / "runs" / run_name)
    if not (run.model_dir / "config.json").is_file():
        resume = run.last_checkpoint.is_file()
        if run.path.exists() and not resume:  # died before its first checkpoint: nothing to keep
            shutil.rmtree(run.path)
        recipe = recipe_from_dict(job.recipe)
        train(recipe, job.data, out=run.path.parent, name=run_name, resume=resume, progress=False,
              **({} if resume else {"splits": job.splits, "splits_source": job.splits_source}))
    cells = {c["id"]: c for c in record["cells"]}
    for cell_id in job.cells:
        cell = cells[cell_id]
        if (folder / "cells" / cell["results"]).is_file():
            continue
        rows: list[dict[str, Any]] = []
        targets = [(Path(job.data), "test"), *((Path(t), "all") for t in job.tests)]
        for data, split in targets:
            scored = evaluate(run.path, data, job.protocol, split, overlays=0, workers=0, level=cell["level"])
            with (scored / "per_case.csv").open(newline="") as handle:
                for row in csv.DictReader(handle):
                    metrics = {k: float(v) for k, v in row.items()
                               if k not in ("stem", "height", "width", "mask_pixels", "predicted_pixels")}
                    rows.append({"model": cell["model"], "dataset": data.name, "seed": cell["seed"],
                                 "fold": "" if cell["fold"] is None else cell["fold"], "case": row["stem"], **metrics})
        write_results_csv(rows, folder / "cells" / cell["results"])


# ---- executors ---------------------------------------------------------------------------------------------

def job_command(folder: Path, run_name: str, threads: int) -> list[str]:
    return [sys.executable, "-m", "medseg.engine.study", str(folder), run_name, str(threads)]


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the study process dies (Linux), so that a killed study leaves
    no orphan training into a run folder the next study process will resume."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: an orphan finishes its run; the lock keeps studies apart
        return


def run_job_process(folder: Path, run_name: str, log: Path, threads: int) -> tuple[str, int]:
    """Run one job in a child process with `threads` CPU threads, its output appended to `log`;
    (run name, exit code)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = job_command(folder, run_name, threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("a") as handle:
        handle.write(f"\n==== {now()} {' '.join(command)}\n")
        handle.flush()
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=_die_with_parent if sys.platform == "linux" else None).returncode
    return run_name, code


def outcome(plan: Plan, run_name: str, code: int) -> str:
    """One line on a finished job: done, or failed with the last line of its log and the log's path."""
    if code == 0:
        return f"{run_name}: done"
    log = plan.log_dir / f"{run_name}.log"
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    return f"{run_name}: FAILED (exit {code}): {lines[-1].strip() if lines else 'no output'} — log {log}"


def run_in_waves(plan: Plan, pending: list[str], start: Callable[[list[str]], Iterator[tuple[str, int]]],
                 report: Callable[[str], None]) -> dict[str, str]:
    """Run the pending jobs wave by wave: each wave every job whose needed runs are done (finished now, or not
    pending); `start(wave)` runs a wave and yields (run, exit code) as each finishes. A job whose needed run
    failed or was not started is not started. Returns {run: why it did not finish} (a failed run: its log)."""
    failures: dict[str, str] = {}
    not_started: set[str] = set()
    waiting = sorted(pending)
    while waiting:
        left, wave = set(waiting), []
        for name in list(waiting):
            broken = [need for need in plan.jobs[name].needs if need in failures]
            if broken:
                why = "was not started" if broken[0] in not_started else f"failed (log {failures[broken[0]]})"
                failures[name] = f"not started: it starts from run {broken[0]}, which {why}"
                report(f"{name}: NOT STARTED: it starts from run {broken[0]}, which {why}")
                not_started.add(name)
                waiting.remove(name)
            elif not any(need in left for need in plan.jobs[name].needs):
                wave.append(name)
        if not wave:
            if waiting and set(waiting) == left:  # planning refuses cycles, so this is a broken study.json
                raise MedsegError(f"study {plan.study.name}: the runs {waiting} wait for each other; plan again")
            continue
        for name, code in start(wave):
            report(outcome(plan, name, code))
            if code:
                failures[name] = str(plan.log_dir / f"{name}.log")
        waiting = [name for name in waiting if name not in wave]
    return failures


def run_local(plan: Plan, pending: list[str], jobs: int, threads: int,
              report: Callable[[str], None]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        def start(wave: list[str]) -> Iterator[tuple[str, int]]:
            futures = [pool.submit(run_job_process, plan.folder, name, plan.log_dir / f"{name}.log", threads)
                       for name in wave]
            for future in futures:
                yield future.result()

        return run_in_waves(plan, pending, start, report)


def run_ray(plan: Plan, pending: list[str], address: Optional[str], threads: int,
            report: Callable[[str], None]) -> dict[str, str]:
    """Each job a Ray task needing `threads` CPUs (and 1 GPU where the cluster has GPUs), a wave at a time; the
    study folder must be on storage every node sees (the same path), as with any shared run folder."""
    try:
        import ray
    except ImportError:
        raise MedsegError("the ray executor needs Ray: pip install 'medseg[ray]'") from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=threads, num_gpus=gpus, max_retries=0)(run_job_process)

        def start(wave: list[str]) -> Iterator[tuple[str, int]]:
            refs = [task.remote(plan.folder, name, plan.log_dir / f"{name}.log", threads) for name in wave]
            for ref in refs:
                yield ray.get(ref)

        return run_in_waves(plan, pending, start, report)
    finally:
        ray.shutdown()


# ---- the command ---------------------------------------------------------------------------------------------

def default_threads(jobs: int) -> int:
    """CPU threads per run: the machine's cores shared by the runs at the same time."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


@contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Hold OUT/<name>/.lock while a study process runs: a second process on the same study is refused in one
    line instead of training the same runs twice. The lock dies with its process (flock), so a killed study
    never leaves a stale lock."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MedsegError(f"another `medseg study` is running on {folder}; wait for it to finish (or stop it) "
                              "and run again") from None
        yield


def run_study(name_or_path: str | Path, out: str | Path = "studies", data: Optional[list[str]] = None,
              tests: Optional[list[str]] = None, executor: str = "local", address: Optional[str] = None,
              jobs: int = 1, dry_run: bool = False, cpu: bool = False, threads: Optional[int] = None,
              report: Callable[[str], None] = print) -> Plan:
    """Plan the study, run every missing run (unless `dry_run`), then aggregate; returns the plan with each
    cell's final state (its `folder` is the study folder).
    `threads`: CPU threads of each run (default: the cores over `jobs`; a Ray task asks for that many CPUs)."""
    if executor not in ("local", "ray"):
        raise MedsegError(f"--executor must be local or ray, got {executor!r}")
    if threads is not None and threads < 1:
        raise MedsegError(f"--threads must be at least 1, got {threads}")
    threads = threads or default_threads(jobs)
    study, base = read_study(name_or_path, data, tests, cpu)
    plan = plan_study(study, base, Path(out))
    if dry_run:
        for cell in plan.cells:
            needs = plan.jobs[cell.run].needs
            starts = f" from {', '.join(needs)}" if needs else ""
            report(f"{cell.id:50} {cell.state:8} run {cell.run}{starts}  ~{estimate(plan, cell):,} images x epochs")
        total = sum(len(job.splits["train"]) * int(job.recipe["train"]["epochs"]) for job in plan.jobs.values())
        report(f"{len(plan.cells)} cells in {len(plan.jobs)} runs; {sum(c.state == 'done' for c in plan.cells)} done; "
               f"training work about {total:,} images x epochs in all")
        return plan
    with study_lock(plan.folder):
        for cell in plan.cells:  # states again, now that no other study process can change them
            cell.state = cell_state(plan, cell)
        write_study_json(plan)
        pending = sorted({c.run for c in plan.cells if c.state != "done"})
        report(f"study {study.name}: {len(plan.cells)} cells in {len(plan.jobs)} runs, {len(pending)} runs to do, "
               f"{threads} thread(s) each -> {plan.folder}")
        started = time.perf_counter()
        failures = (run_ray(plan, pending, address, threads, report) if executor == "ray"
                    else run_local(plan, pending, jobs, threads, report)) if pending else {}
        for cell in plan.cells:
            cell.state = cell_state(plan, cell)
            if cell.run in failures:
                cell.state, cell.error = "failed", failures[cell.run]
        write_study_json(plan)
        if not any(cell.state == "done" for cell in plan.cells):
            raise MedsegError(f"study {study.name}: no run finished; see the failures above and the logs in "
                              f"{plan.log_dir}")
        reports = aggregate_study(plan.folder)
    failed = sorted({c.run for c in plan.cells if c.state == "failed"})
    report(f"study {study.name}: {sum(c.state == 'done' for c in plan.cells)}/{len(plan.cells)} cells done in "
           f"{time.perf_counter() - started:.0f}s" + (f", {len(failed)} run(s) failed (logs above)" if failed else "")
           + f"; report {', '.join(str(r) for r in reports)}")
    return plan


def aggregate_study(folder: str | Path) -> list[Path]:
    """results.csv, summary.csv, tests.csv, report.md and plots/ from the finished cells of a study folder; one
    set per training dataset (in OUT/<name>/ for one, OUT/<name>/<dataset>/ for several: each training
    dataset is its own study). Returns the reports written."""
    folder = Path(folder)
    if not (folder / "study.json").is_file():
        raise MedsegError(f"{folder} is not a study folder (no study.json); give the folder `medseg study` wrote")
    record = json.loads((folder / "study.json").read_text())
    study = record["study"]
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for cell in record["cells"]:
        by_dataset.setdefault(cell["dataset"], []).append(cell)
    reports = []
    for trained_on, cells in by_dataset.items():
        out = folder if len(by_dataset) == 1 else folder / slug(trained_on)
        rows: list[dict[str, Any]] = []
        missing = []
        scored = []
        for cell in cells:
            path = folder / "cells" / cell["results"]
            if path.is_file():
                rows += read_results_csv(path)
                scored.append(cell)
            else:
                error = cell.get("error") or ""  # a failed run's log, or why a run was not started
                detail = f", log {error}" if error.endswith(".log") else f", {error}" if error else ""
                missing.append(f"{cell['id']} ({cell['state']}{detail})")
        if not rows:
            continue
        write_results_csv(rows, out / "results.csv")
        title = f"Study {study['name']}" + ("" if len(by_dataset) == 1 else f", trained on {trained_on}")
        aggregate(out / "results.csv", out, reference=record["reference"],
                  main_metric=get_protocol(record["protocol"]).rank_metric, costs=study_costs(folder, record, scored),
                  missing=missing, title=title, description=study.get("description", ""))
        reports.append(out / "report.md")
    if not reports:
        raise MedsegError(f"{folder}: no cell has finished yet; run the study first")
    return reports


def study_costs(folder: Path, record: dict[str, Any], cells: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Parameters, GFLOPs and batch-1 CPU latency of the models of `cells` (scored cells: their networks ran at
    their training size), from `benchmark`, cached in costs.json: measured once per model configuration."""
    import torch

    from medseg.engine.benchmark import benchmark_network
    from medseg.engine.inference import prune_to
    from medseg.models import create_model

    cache_file = folder / "costs.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    costs: dict[str, dict[str, float]] = {}
    for cell in cells:
        if cell["model"] in costs:
            continue
        model_cfg = record["runs"][cell["run"]]["recipe"]["model"]
        size = record["runs"][cell["run"]]["recipe"]["data"]["size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        key = json.dumps({"model": model_cfg, "size": size, "level": cell["level"]}, sort_keys=True)
        if key not in cache:
            options = {k: v for k, v in model_cfg.items()
                       if k not in ("name", "in_channels", "num_classes", "weights", "encoder_weights")}
            torch.manual_seed(0)
            network = prune_to(create_model(model_cfg["name"], model_cfg["in_channels"], model_cfg["num_classes"],
                                            **options), cell["level"])
            result = benchmark_network(network, cell["model"], size, batch=1, device="cpu", warmup=1, repeats=3)
            cache[key] = {k: result[k] for k in ("params", "gflops", "latency_ms_b1")}
            write_text_atomic(cache_file, json.dumps(cache, indent=1) + "\n")
        costs[cell["model"]] = cache[key]
    return costs


def main() -> None:
    """`python -m medseg.engine.study FOLDER RUN THREADS`: one job of a planned study (what the executors start)."""
    folder, run_name, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    import torch

    torch.set_num_threads(threads)
    try:
        execute_job(folder, run_name)
    except MedsegError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
