"""RUN/curves.png: a run's training curves, drawn from its metrics.csv after every training (a resume
included) with matplotlib's Agg canvas, imported only here, when a picture is drawn.

Three panels per epoch: training and validation loss; the recipe's monitored metric (`train.monitor`,
what best.ckpt is chosen by); the learning rate of each optimiser group (log scale).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from medseg.engine.callbacks import column_of
from medseg.errors import MedsegError
from medseg.files import atomic_file


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise MedsegError(f"{path} is missing; curves are drawn from a run's metrics.csv")
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _series(rows: list[dict[str, str]], column: str) -> list[float]:
    return [float(row[column]) if row.get(column) not in (None, "") else math.nan for row in rows]


def write_curves(metrics_csv: Path, out: Path, monitor: str) -> Path:
    """Draw `metrics_csv` into the PNG `out` (written under a temporary name, then renamed); returns `out`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_csv)
    if not rows:
        raise MedsegError(f"{metrics_csv} has no epochs to draw")
    columns = list(rows[0])
    epochs = [int(row["epoch"]) + 1 for row in rows]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    losses, metric, rates = figure.subplots(1, 3)

    for column, label in (("train_loss", "train"), ("val_loss", "val")):
        if column in columns:
            losses.plot(epochs, _series(rows, column), marker=".", label=label)
    losses.set(title="loss", xlabel="epoch")
    losses.legend()

    monitored = column_of(monitor) or monitor
    if monitored in columns:
        metric.plot(epochs, _series(rows, monitored), marker=".", color="tab:green")
    else:
        metric.text(0.5, 0.5, f"{monitor} was not logged", ha="center", va="center", transform=metric.transAxes)
    metric.set(title=f"{monitor} (monitored)", xlabel="epoch")

    lr_columns = [c for c in columns if c == "lr" or c.startswith("lr_")]
    for column in lr_columns:
        rates.plot(epochs, _series(rows, column), marker=".", label=column.removeprefix("lr_"))
    if lr_columns and all(v > 0 for c in lr_columns for v in _series(rows, c) if not math.isnan(v)):
        rates.set_yscale("log")
    if len(lr_columns) > 1:
        rates.legend()
    rates.set(title="learning rate", xlabel="epoch")

    for axes in (losses, metric, rates):
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    with atomic_file(out) as tmp, tmp.open("wb") as stream:
        figure.savefig(stream, format="png", dpi=100)
    return out
