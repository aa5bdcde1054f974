"""The aggregation and report of a multi-model study: from the per-case scores of every (model, seed, fold)
cell on every evaluated dataset (`results.csv`) to summary.csv, tests.csv, report.md and plots/.

Why per-case scores and paired tests. A table of means hides how much of a difference between two models is
noise: U-Bench (a benchmark of 100 U-Net variants, 2025) found that the gains variants report in-domain are
often small and statistically weak, and frequently vanish when the models are tested on datasets they were not
trained on. So a study scores every case (as nnU-Net's evaluation does: one score per case, aggregated later,
never one pooled number) on the held-out fold of the training dataset and on whole external test datasets,
and each model is compared with one reference model by a paired test on those per-case scores.

What is computed:

- `summarize`: per (model, dataset, metric) the mean and the *population* standard deviation (ddof=0) over the
  cells (seed x fold) of each cell's per-case mean, and n = the number of cells. The spread over cells is the
  run-to-run variation a reader can expect when training the model again; ddof=0 because the cells are the
  whole set of runs described, not a sample to estimate a wider variance from (with 4 cells the ddof=1 value
  is 1.15 times larger). NaN cases (a protocol's empty-case rule) are left out of their cell's mean; a cell
  whose cases are all NaN is left out of the mean, the std and n.
- `paired_tests`: per dataset, each model against the reference, on per-case scores matched on
  (seed, fold, case), pairs kept where both values are not NaN. The difference is always model - reference;
  for a metric where higher is better a positive difference favours the model, for a lower-is-better metric
  (`mae`, and any name starting with `hd`, `assd` or `med`: distances) a negative one does (`higher_is_better`).
  The test is the Wilcoxon signed-rank test (two-sided, `scipy.stats.wilcoxon`, zero_method="wilcox": zero
  differences are dropped before ranking, Wilcoxon's original rule, so ties between the models count for
  neither). With fewer than 6 pairs, or fewer than 6 non-zero differences, no p is given (NaN and a reason):
  with 5 the smallest two-sided p possible is 2/2^5 = 0.0625, so the test could never reject at 0.05.
  The p values of the models compared on one dataset are corrected together by Holm's step-down method
  (`holm`), which controls the family-wise error rate without assuming independence, and is uniformly more
  powerful than Bonferroni.
- the difference column of the report: the mean, over the cells (seed, fold) both models have, of the
  difference of the two cells' per-case means (paired by cell like the test, so a missing cell of one model
  does not shift the other's mean).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medseg.engine.run import slug
from medseg.errors import MedsegError
from medseg.files import atomic_file, atomic_folder, write_text_atomic

IDENTITY = ("model", "dataset", "seed", "fold", "case")
SUMMARY_COLUMNS = ("model", "dataset", "metric", "mean", "std", "n")
TEST_COLUMNS = ("dataset", "model", "reference", "metric", "n_pairs", "median_difference", "cells_paired",
                "mean_cell_difference", "p", "p_holm", "favours", "reason")
MIN_PAIRS = 6  # with 5 pairs the smallest two-sided Wilcoxon p is 0.0625: the test could never reject at 0.05
TEST_SENTENCE = ("Wilcoxon signed-rank test over per-case scores matched on seed, fold and case, two-sided; "
                 "Holm correction across the models compared with {reference}")


# ---------------------------------------------------------------------------------------------- rows and CSV


def higher_is_better(metric: str) -> bool:
    """False for distances and errors: `mae` and names starting with `hd` (Hausdorff), `assd` or `med` (GOALS'
    layer-edge distance)."""
    name = metric.lower()
    return not (name == "mae" or name.startswith(("hd", "assd", "med")))


def _number(value: Any) -> float:
    """A metric value as a float; None, "" and unparsable text are NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _label(value: Any) -> int | str | None:
    """A seed or fold: an int when it is one, None when empty (no cross-validation), otherwise the text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _key(row: Mapping[str, Any]) -> tuple[str, str, int | str | None, int | str | None, str]:
    """(model, dataset, seed, fold, case) of a row, seed and fold normalised by `_label`."""
    missing = [k for k in IDENTITY if k not in row]
    if missing:
        raise MedsegError(f"a results row lacks the column(s) {', '.join(missing)}; each row needs "
                          f"{', '.join(IDENTITY)} and one column per metric: {dict(row)}")
    return str(row["model"]), str(row["dataset"]), _label(row["seed"]), _label(row["fold"]), str(row["case"])


def metric_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The metric columns of the rows (every column but the identity ones), sorted."""
    return sorted({k for row in rows for k in row if k not in IDENTITY})


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _models(rows: Sequence[Mapping[str, Any]], reference: str | None = None) -> list[str]:
    """Models in order of first appearance, the reference first."""
    found = _ordered(str(r["model"]) for r in rows)
    return ([reference] if reference in found else []) + [m for m in found if m != reference]


def _datasets(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return _ordered(str(r["dataset"]) for r in rows)


def _text(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float; NaN is "nan"
    return "" if value is None else str(value)


def write_results_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write per-case rows to `path` (atomically): columns model, dataset, seed, fold, case, then the metrics
    sorted; floats at full precision, NaN as "nan", a missing metric or fold as an empty field."""
    metrics = metric_names(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*IDENTITY, *metrics])
    for row in rows:
        model, dataset, seed, fold, case = _key(row)
        writer.writerow([model, dataset, _text(seed), _text(fold), case,
                         *(_text(_number(row[m])) if m in row else "" for m in metrics)])
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


def read_results_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results.csv: seed and fold as ints (fold None when empty), case and names as text, every
    metric as a float (NaN kept, an empty field is NaN)."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path} is missing; a study writes its per-case scores to results.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in IDENTITY if c not in (reader.fieldnames or [])]
        if missing:
            raise MedsegError(f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(IDENTITY)} "
                              f"and one column per metric")
        rows = []
        for raw in reader:
            model, dataset, seed, fold, case = _key(raw)
            row: dict[str, Any] = {"model": model, "dataset": dataset, "seed": seed, "fold": fold, "case": case}
            row.update({k: _number(v) for k, v in raw.items() if k not in IDENTITY})
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- summary


def _cell_means(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[tuple, dict[tuple, float]]:
    """(model, dataset) -> (seed, fold) -> the cell's per-case mean of `metric` over its non-NaN cases
    (cells with no such case are absent)."""
    values: dict[tuple, dict[tuple, list[float]]] = {}
    for row in rows:
        model, dataset, seed, fold, _ = _key(row)
        value = _number(row.get(metric))
        if not math.isnan(value):
            values.setdefault((model, dataset), {}).setdefault((seed, fold), []).append(value)
    return {group: {cell: float(np.mean(v)) for cell, v in cells.items()} for group, cells in values.items()}


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, dataset, metric): mean and population std (ddof=0) over cells of each cell's per-case mean
    (NaN cases left out), and n = the number of cells. Rows in order of the datasets, then models, as they
    first appear; metrics sorted."""
    metrics = metric_names(rows)
    means = {metric: _cell_means(rows, metric) for metric in metrics}
    summary = []
    for dataset in _datasets(rows):
        for model in _models(rows):
            for metric in metrics:
                cells = means[metric].get((model, dataset))
                if not cells:
                    continue
                values = np.array(list(cells.values()))
                summary.append({"model": model, "dataset": dataset, "metric": metric, "mean": float(values.mean()),
                                "std": float(values.std(ddof=0)), "n": len(values)})
    return summary


def _write_table(path: str | Path, columns: Sequence[str], records: Sequence[Mapping[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_text(record.get(c)) for c in columns])
    write_text_atomic(path, buffer.getvalue())
    return Path(path)


def write_summary_csv(summary: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """summary.csv: model, dataset, metric, mean, std (population, ddof=0, over cells), n (cells)."""
    return _write_table(path, SUMMARY_COLUMNS, summary)


def write_tests_csv(tests: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """tests.csv: one row per (dataset, model) compared with the reference, columns `TEST_COLUMNS`."""
    return _write_table(path, TEST_COLUMNS, tests)


# --------------------------------------------------------------------------------------------------- tests


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the input order.

    With the m non-NaN p values sorted ascending p_(1) <= ... <= p_(m), the adjusted value of the i-th is
    max over j <= i of min(1, (m - j + 1) p_(j)): the smallest is multiplied by m, the next by m - 1, ...,
    each kept at least as large as the one before it (monotone) and capped at 1. Rejecting where the adjusted
    p is below alpha controls the family-wise error rate at alpha. NaN entries (tests not run) are not part of
    the family and stay NaN. Example: [0.01, 0.04, 0.03] -> [0.03, 0.06, 0.06]."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    m, running = len(tested), 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _wilcoxon(differences: np.ndarray) -> tuple[float, str]:
    """(p, reason): two-sided Wilcoxon signed-rank p of paired differences, or NaN and why it was not run."""
    n = len(differences)
    nonzero = int(np.count_nonzero(differences))
    if n < MIN_PAIRS:
        return math.nan, f"fewer than {MIN_PAIRS} matched pairs ({n})"
    if nonzero == 0:
        return math.nan, f"all {n} differences are zero"
    if nonzero < MIN_PAIRS:
        return math.nan, (f"fewer than {MIN_PAIRS} non-zero differences ({nonzero} of {n} pairs; zero differences "
                          f"are dropped, zero_method='wilcox')")
    from scipy import stats

    try:
        result = stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    except ValueError as exc:
        return math.nan, f"scipy.stats.wilcoxon failed: {exc}"
    p = float(result.pvalue)
    return p, ("" if not math.isnan(p) else "scipy.stats.wilcoxon gave no p")


def _favours(difference: float, metric: str) -> str:
    if math.isnan(difference) or difference == 0:
        return "neither"
    return "model" if (difference > 0) == higher_is_better(metric) else "reference"


def paired_tests(rows: Sequence[Mapping[str, Any]], reference: str, metric: str) -> list[dict[str, Any]]:
    """Per dataset (in order of appearance), per model other than the reference: the paired comparison of
    `metric` with the reference on per-case scores matched on (seed, fold, case), pairs where both are not
    NaN. Each record has the columns `TEST_COLUMNS`:

    n_pairs, median_difference (of the per-case differences model - reference), cells_paired and
    mean_cell_difference (mean over the cells both models have of the difference of their per-case means),
    p (two-sided Wilcoxon signed-rank, zero_method="wilcox"; NaN with a `reason` when fewer than 6 pairs or
    non-zero differences), p_holm (Holm across the models of that dataset), favours ("model", "reference" or
    "neither", by the sign of mean_cell_difference and `higher_is_better(metric)`)."""
    models = _models(rows, reference)
    if reference not in models:
        raise MedsegError(f"the reference model {reference!r} has no results; models: {', '.join(models)}")
    if metric not in metric_names(rows):
        raise MedsegError(f"no metric {metric!r} in the results; metrics: {', '.join(metric_names(rows))}")
    scores: dict[tuple, dict[tuple, float]] = {}
    for row in rows:
        model, dataset, seed, fold, case = _key(row)
        value = _number(row.get(metric))
        cases = scores.setdefault((model, dataset), {})
        if (seed, fold, case) in cases:
            raise MedsegError(f"case {case!r} appears twice for model {model!r}, dataset {dataset!r}, seed {seed}, "
                              f"fold {fold}; each cell scores a case once")
        if not math.isnan(value):
            cases[(seed, fold, case)] = value
    cell_means = _cell_means(rows, metric)

    tests = []
    for dataset in _datasets(rows):
        present = [m for m in models if (m, dataset) in scores]  # models with rows on the dataset
        family = []
        for model in (m for m in present if m != reference):
            record = {"dataset": dataset, "model": model, "reference": reference, "metric": metric}
            if reference not in present:
                record.update(n_pairs=0, median_difference=math.nan, cells_paired=0, mean_cell_difference=math.nan,
                              p=math.nan, reason=f"the reference {reference} has no scores on {dataset}")
            else:
                ours, theirs = scores.get((model, dataset), {}), scores.get((reference, dataset), {})
                matched = [k for k in ours if k in theirs]
                differences = np.array([ours[k] - theirs[k] for k in matched], dtype=float)
                p, reason = _wilcoxon(differences)
                our_cells = cell_means.get((model, dataset), {})
                their_cells = cell_means.get((reference, dataset), {})
                cell_differences = [our_cells[c] - their_cells[c] for c in our_cells if c in their_cells]
                record.update(n_pairs=len(differences),
                              median_difference=float(np.median(differences)) if len(differences) else math.nan,
                              cells_paired=len(cell_differences),
                              mean_cell_difference=float(np.mean(cell_differences)) if cell_differences else math.nan,
                              p=p, reason=reason)
            record["favours"] = _favours(record["mean_cell_difference"], metric)
            family.append(record)
        for record, adjusted in zip(family, holm([r["p"] for r in family])):
            record["p_holm"] = adjusted
        tests += [{c: r[c] for c in TEST_COLUMNS} for r in family]
    return tests


# --------------------------------------------------------------------------------------------------- plots


def _png(figure: Any, path: Path) -> Path:
    with atomic_file(path) as tmp, tmp.open("wb") as stream:
        figure.savefig(stream, format="png", dpi=100)
    return path


def _slugs(datasets: Sequence[str]) -> dict[str, str]:
    names = {d: slug(d) for d in datasets}
    clashes = {n for n in names.values() if list(names.values()).count(n) > 1}
    if clashes:
        raise MedsegError(f"dataset names {sorted(d for d, n in names.items() if n in clashes)} give the same "
                          f"file name; rename one")
    return names


def _cost(costs: Mapping[str, Mapping[str, Any]] | None, model: str, key: str) -> float | None:
    value = (costs or {}).get(model, {}).get(key)
    number = _number(value)
    return None if math.isnan(number) else number


def plots(rows: Sequence[Mapping[str, Any]], summary: Sequence[Mapping[str, Any]],
          costs: Mapping[str, Mapping[str, Any]] | None, main_metric: str, folder: str | Path,
          reference: str | None = None) -> dict[str, dict[str, Path]]:
    """Draw into `folder` (each PNG written atomically), per dataset:

    - `box_<dataset>_<metric>.png`: box plots of the per-case `main_metric` (all cells pooled, NaN left out),
      one box per model (the reference first when given);
    - `efficiency_<dataset>.png`: the summary mean of `main_metric` +- its std over cells against GFLOPs, one
      labelled point per model with a known GFLOPs cost; no file when no model of the dataset has one.

    Names are slugged (`medseg.engine.run.slug`: no slashes or spaces). Returns dataset -> {"box": path,
    "efficiency": path}, a kind absent when its picture was not drawn (no finite score, no cost)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = Path(folder)
    datasets = _datasets(rows)
    names = _slugs(datasets)
    arrow = "higher is better" if higher_is_better(main_metric) else "lower is better"
    drawn: dict[str, dict[str, Path]] = {}
    for dataset in datasets:
        drawn[dataset] = {}
        values = {m: [v for r in rows if str(r["model"]) == m and str(r["dataset"]) == dataset
                      if not math.isnan(v := _number(r.get(main_metric)))] for m in _models(rows, reference)}
        values = {m: v for m, v in values.items() if v}
        if values:
            figure = Figure(figsize=(max(4.0, 1.1 * len(values) + 2), 4.2), layout="constrained")
            FigureCanvasAgg(figure)
            axes = figure.subplots()
            axes.boxplot(list(values.values()), showmeans=True)
            axes.set_xticks(range(1, len(values) + 1), list(values), rotation=30 if len(values) > 4 else 0)
            axes.set(title=f"{dataset}: per-case {main_metric}", ylabel=f"{main_metric} ({arrow})")
            axes.grid(axis="y", alpha=0.3)
            drawn[dataset]["box"] = _png(figure, folder / f"box_{names[dataset]}_{slug(main_metric)}.png")

        points = [(s["model"], gflops, s["mean"], s["std"]) for s in summary
                  if s["dataset"] == dataset and s["metric"] == main_metric
                  and (gflops := _cost(costs, s["model"], "gflops")) is not None]
        if points:
            figure = Figure(figsize=(5.5, 4.2), layout="constrained")
            FigureCanvasAgg(figure)
            axes = figure.subplots()
            for model, gflops, mean, std in points:
                axes.errorbar([gflops], [mean], yerr=[std], fmt="o", capsize=4,
                              color="tab:red" if model == reference else "tab:blue")
                axes.annotate(model, (gflops, mean), textcoords="offset points", xytext=(5, 5), fontsize=9)
            axes.set(title=f"{dataset}: {main_metric} against compute", xlabel="GFLOPs",
                     ylabel=f"{main_metric}, mean ± std over cells ({arrow})")
            axes.margins(x=0.2, y=0.1)  # room for the labels of the outermost points
            axes.grid(alpha=0.3)
            drawn[dataset]["efficiency"] = _png(figure, folder / f"efficiency_{names[dataset]}.png")
    return drawn


# -------------------------------------------------------------------------------------------------- report


def _fixed(value: float, digits: int = 4, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.4f}" if value >= 1e-3 else f"{value:.1e}"


def _costs_cells(costs: Mapping[str, Mapping[str, Any]] | None, model: str) -> list[str]:
    params = _cost(costs, model, "params")
    gflops = _cost(costs, model, "gflops")
    latency = _cost(costs, model, "latency_ms_b1")
    return ["n/a" if params is None else f"{params / 1e6:.2f} M",
            "n/a" if gflops is None else f"{gflops:.2f}",
            "n/a" if latency is None else f"{latency:.2f}"]


def _link(target: Path, report: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), report.parent.resolve())).as_posix()


def write_report(path: str | Path, *, title: str, study_description: str, rows: Sequence[Mapping[str, Any]],
                 summary: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]],
                 costs: Mapping[str, Mapping[str, Any]] | None, reference: str, main_metric: str,
                 missing: Sequence[str], plots: Mapping[str, Mapping[str, Path]] | None) -> Path:
    """report.md (atomically): per evaluated dataset a table model | cells | main metric mean +- std |
    difference to the reference | Wilcoxon p | Holm p | params | GFLOPs | latency, the test named under it,
    a second table with the other metrics, links to the plots; then the missing cells."""
    path = Path(path)
    means = {(s["model"], s["dataset"], s["metric"]): s for s in summary}
    by_pair = {(t["dataset"], t["model"]): t for t in tests}
    metrics = metric_names(rows)
    others = [m for m in metrics if m != main_metric]
    direction = "higher" if higher_is_better(main_metric) else "lower"
    sign = "positive" if direction == "higher" else "negative"

    def spread(model: str, dataset: str, metric: str) -> str:
        s = means.get((model, dataset, metric))
        return "n/a" if s is None else f"{_fixed(s['mean'])} ± {_fixed(s['std'])}"

    lines = [f"# {title}", ""]
    if study_description.strip():
        lines += [study_description.strip(), ""]
    lines += [f"Main metric: **{main_metric}** ({direction} is better); reference model: **{reference}**.",
              "",
              "Mean ± std: population standard deviation (ddof=0) over the cells (one trained model per seed and "
              "fold) of each cell's mean over its cases; cases without a score (NaN, the protocol's empty-case rule) "
              "are left out of their cell's mean. *cells*: how many cells were scored.",
              "",
              f"Difference = model − {reference}: the mean, over the cells (seed, fold) both models have, of the "
              f"difference of their per-cell means (not the difference of the summary means). For {main_metric} "
              f"{direction} is better, so a {sign} difference favours the model.",
              ""]
    for dataset in _datasets(rows):
        cases = len({str(r["case"]) for r in rows if str(r["dataset"]) == dataset})
        models = [m for m in _models(rows, reference) if any(str(r["model"]) == m and str(r["dataset"]) == dataset
                                                              for r in rows)]
        lines += [f"## {dataset}", "", f"{cases} distinct cases, {len(models)} models.", "",
                    f"| model | cells | {main_metric} mean ± std | difference to {reference} ({sign} is better) "
                  f"| Wilcoxon p | Holm p | params | GFLOPs | latency ms (batch 1) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        reasons = []
        for model in models:
            s = means.get((model, dataset, main_metric))
            cells = str(s["n"]) if s else "0"
            if model == reference:
                compared = ["(reference)", "", ""]
            else:
                t = by_pair.get((dataset, model))
                if t is None:
                    compared = ["n/a", "n/a", "n/a"]
                else:
                    compared = [_fixed(t["mean_cell_difference"], sign=True), _p(t["p"]), _p(t["p_holm"])]
                    if t.get("reason"):
                        reasons.append(f"- {model}: no p, {t['reason']}.")
            lines.append(f"| {model} | {cells} | {spread(model, dataset, main_metric)} | {' | '.join(compared)} | "
                         f"{' | '.join(_costs_cells(costs, model))} |")
        lines += ["", TEST_SENTENCE.format(reference=reference) + " (zero differences dropped, zero_method='wilcox'; "
                  f"pairs where both models have a score; no p below {MIN_PAIRS} pairs).", ""]
        if reasons:
            lines += reasons + [""]
        if others:
            header = " | ".join(f"{m} ({'↑' if higher_is_better(m) else '↓'})" for m in others)
            lines += ["Other metrics, mean ± std over cells (↑ higher is better, ↓ lower is better):", "",
                      f"| model | {header} |", "|---|" + "---|" * len(others)]
            lines += [f"| {model} | {' | '.join(spread(model, dataset, m) for m in others)} |" for model in models]
            lines.append("")
        pictures = (plots or {}).get(dataset, {})
        if pictures:
            captions = {"box": f"per-case {main_metric} per model", "efficiency": f"{main_metric} against GFLOPs"}
            lines += [f"![{dataset}: {captions.get(kind, kind)}]({_link(picture, path)})"
                      for kind, picture in pictures.items()] + [""]
    if missing:
        lines += ["## Missing cells", "", "These cells failed or did not run; they are in none of the numbers above.",
                  ""] + [f"- {cell}" for cell in missing] + [""]
    write_text_atomic(path, "\n".join(lines).rstrip("\n") + "\n")
    return path


# ------------------------------------------------------------------------------------------------ one call


def aggregate(results_path_or_rows: str | Path | Sequence[Mapping[str, Any]], out_folder: str | Path, *,
              reference: str, main_metric: str, costs: Mapping[str, Mapping[str, Any]] | None = None,
              missing: Sequence[str] = (), title: str = "Study report", description: str = "") -> dict[str, Any]:
    """Summarize, test and report a study into `out_folder`: summary.csv, tests.csv (the paired tests of
    `main_metric`), plots/ (replaced whole) and report.md. Returns {"summary", "tests", "report", "plots"
    (the folder), "pictures" (the PNG paths)}."""
    if isinstance(results_path_or_rows, (str, Path)):
        rows = read_results_csv(results_path_or_rows)
    else:
        rows = list(results_path_or_rows)
    if not rows:
        raise MedsegError("no results to aggregate: every cell failed or none ran")
    out = Path(out_folder)
    summary = summarize(rows)
    tests = paired_tests(rows, reference, main_metric)
    with atomic_folder(out / "plots", replace=True) as tmp:
        drawn = plots(rows, summary, costs, main_metric, tmp, reference=reference)
    drawn = {d: {k: out / "plots" / p.name for k, p in kinds.items()} for d, kinds in drawn.items()}
    paths = {"summary": write_summary_csv(summary, out / "summary.csv"),
             "tests": write_tests_csv(tests, out / "tests.csv"),
             "report": out / "report.md", "plots": out / "plots",
             "pictures": [p for kinds in drawn.values() for p in kinds.values()]}
    write_report(paths["report"], title=title, study_description=description, rows=rows, summary=summary,
                 tests=tests, costs=costs, reference=reference, main_metric=main_metric, missing=missing, plots=drawn)
    return paths
