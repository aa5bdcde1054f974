"""The `medseg` command (typer). Each pipeline stage is a command; user errors print one line, exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medseg.errors import MedsegError, user_message
from medseg.files import check_output_file

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="2D medical image segmentation: five papers and their baselines, side by side.")
console = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs: no truncated tables


def _print_version(value: bool) -> None:
    if value:
        from medseg import __version__

        console.print(f"medseg {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="print medseg's version and exit")) -> None:
    """2D medical image segmentation: five papers and their baselines, side by side. Commands import torch and
    Lightning only when they run, so --help answers at once."""


@app.command("models")
def models_command() -> None:
    """Table of registered networks: paper, parameters (3 input channels, the paper's output channels), input size.

    Example: medseg models
    """
    import json
    from importlib import resources

    # The table is data written by `python -m medseg.models.catalogue` (a test keeps it current): no torch here.
    rows = json.loads((resources.files("medseg") / "models" / "catalogue.json").read_text())
    table = Table(title="medseg networks")
    for column in ("name", "paper", "params", "in->out", "default size", "size multiple", "recipe"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["paper"], f"{row['params']:,}", f"{row['in_channels']}->{row['out_channels']}",
                      str(row["default_size"]), str(row["size_multiple"]),
                      row["recipe"] or "-")
    console.print(table)


@app.command("recipes")
def recipes_command() -> None:
    """Table of built-in recipes: network, classes, epochs, metric protocol, description.

    Example: medseg recipes
    """
    from medseg.config import list_recipes, load_recipe

    table = Table(title="medseg recipes (medseg train --recipe NAME)")
    for column in ("name", "network", "classes", "epochs", "protocol", "description"):
        table.add_column(column)
    for name in list_recipes():
        recipe = load_recipe(name)  # validated: a shipped recipe that does not load fails here, not in training
        table.add_row(name, recipe.model.name, str(recipe.model.num_classes), str(recipe.train.epochs),
                      recipe.eval.protocol, recipe.description)
    console.print(table)


@app.command("check-data")
def check_data_command(
    data: Path = typer.Argument(..., help="data folder (DATA/images + DATA/masks, or nnU-Net raw layout), or a folder "
                                "of volume pairs (images/ + labels/ of NIfTI, NRRD, MHA/MHD or DICOM series folders)"),
    num_classes: int = typer.Option(1, min=1, max=256,
                                    help="1 = binary masks (0/255 or 0/1); >= 2 = integer label masks"),
    mask_threshold: Optional[int] = typer.Option(None, min=0,
                                                 help="binary: foreground = value > threshold (noisy masks)"),
    recipe: Optional[str] = typer.Option(None, help="take num_classes and mask_threshold from this recipe"),
    all_files: bool = typer.Option(False, "--all", help="one line per file, instead of one per problem with a count "
                                   "and the first files"),
    series: Optional[str] = typer.Option(None, help="volumes: the DICOM series UID to read where a folder holds "
                                         "several"),
) -> None:
    """Report every problem of a data folder at once: unpaired or unreadable files, size mismatches,
    unexpected mask values; empty masks as information. Files sharing a problem share one line (--all: one line
    per file). Exit code 1 when there are errors.

    A folder of volume pairs gets the volume check (pairs, readable volumes, shapes and voxel grids, NaN voxels,
    integer labels; volumes, slices, spacing and anisotropy).

    Example: medseg check-data ../shared/data/kvasir_seg
    """
    from medseg.config import load_recipe
    from medseg.data.check import check_data
    from medseg.data.io import RECIPE_KEYS, SettingNames
    from medseg.data.volume_check import check_volumes, summary_lines
    from medseg.data.volumes import is_volume_folder

    names = SettingNames(num_classes="--num-classes", mask_threshold="--mask-threshold")
    if recipe:
        chosen = load_recipe(recipe)
        num_classes, mask_threshold = chosen.model.num_classes, chosen.data.mask_threshold
        names = RECIPE_KEYS  # the settings came from the recipe: fix them there
    volumes = data.is_dir() and is_volume_folder(data)
    if series is not None and not volumes:
        raise MedsegError(f"--series is for folders of volumes, and {data} is not one; leave --series out")
    if volumes and mask_threshold is not None and not recipe:
        raise MedsegError(f"--mask-threshold is for 2D masks, and {data} holds volumes, whose labels are integers "
                          "(binary: every label > 0 is foreground); leave --mask-threshold out")
    report = check_volumes(data, num_classes, series, progress=True) if volumes else \
        check_data(data, num_classes, mask_threshold, names=names, progress=True)
    stats = report.stats
    lines = summary_lines(report) if volumes else [f"{report.root} ({report.kind} layout): {report.n_cases} cases, "
                                                   f"{'binary' if num_classes == 1 else f'{num_classes} classes'}"]
    if stats.get("height"):
        lines.append(f"  sizes: height {stats['height'][0]}-{stats['height'][1]}, width {stats['width'][0]}-"
                     f"{stats['width'][1]} ({stats['distinct_sizes']} distinct); channels {stats['channels']}; "
                     f"dtypes {stats['dtypes']}")
    if stats.get("mean_foreground_fraction") is not None:
        values = stats["label_values"]
        shown = ", ".join(map(str, values[:12])) + (f", ... ({len(values)} distinct)" if len(values) > 12 else "")
        lines.append(f"  masks: label values {{{shown}}}, mean foreground "
                     f"{100 * stats['mean_foreground_fraction']:.1f}%, {stats['empty_masks']} empty")
    for line in lines:
        console.print(Text(line), soft_wrap=True)
    colours = {"error": "red", "warning": "yellow", "info": "cyan"}
    # one line per problem (--all: per file), so the list can be grepped and diffed
    rows = [(p.level, p.kind, p.line()) for p in report.problems] if all_files else \
        [(g.level, g.kind, g.line()) for g in report.groups()]
    for level, kind, text in rows:
        console.print(Text.assemble((f"{level:7}", colours[level]), f" {kind:15} {text}"), soft_wrap=True)
    console.print(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s), {len(report.infos)} info")
    if report.errors:
        raise typer.Exit(1)


@app.command("train")
def train_command(
    recipe: str = typer.Option(..., help="built-in recipe name (see `medseg models`) or a YAML file"),
    data: Path = typer.Option(..., help="data folder"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: --set train.epochs=2 (repeatable)"),
    out: Path = typer.Option(Path("runs"), help="folder that holds run folders"),
    name: Optional[str] = typer.Option(None, help="run folder name (default: <recipe>-<data>, numbered if taken)"),
    devices: int = typer.Option(1, min=1, help="processes/GPUs; > 1 trains with DDP (gloo on CPU)"),
    resume: bool = typer.Option(False, help="continue the latest (or --name) run from its last.ckpt"),
) -> None:
    """Train a recipe on a data folder; writes a run folder (config, splits, metrics, checkpoints, model).

    Example: medseg train --recipe unet --data ../shared/data/kvasir_seg --set data.size=128 --set train.epochs=2
    """
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from medseg.config import load_recipe
    from medseg.engine.train import train

    chosen = load_recipe(recipe, set_)
    run = train(chosen, data, out=out, name=name, devices=devices, resume=resume, overrides=set_)
    if rank_zero_only.rank == 0:  # DDP child processes re-run this command: only rank 0 prints
        console.print(f"run folder: [bold]{run.path}[/] (model in {run.model_dir}); "
                      f"next: medseg evaluate {run.path} --data {data}")


LARGEST_HELP = "keep only the largest connected component (8-connected) of each class"
MIN_SIZE_HELP = "drop connected components smaller than this many pixels"
FILL_HOLES_HELP = "fill holes inside predicted objects"
RECIPE_DEFAULT = " (default: the recipe's eval.postprocess, else off)"
SPACING_HELP = ("pixel spacing of the surface metrics (HD95, ASSD, NSD): one number, ROW,COLUMN, or 'file' (each "
                "mask's PNG/TIFF resolution, in mm); default 1 (pixels)")


@app.command("evaluate")
def evaluate_command(
    run: Path = typer.Argument(..., help="run folder written by `medseg train`"),
    data: Optional[Path] = typer.Option(None, help="data folder: the training folder (scores its test split; the "
                                        "default, from the run's config.yaml) or another one"),
    protocol: Optional[str] = typer.Option(None, help="metric protocol: paper, nnunet, pooled, pranet, m2snet, "
                                           "infnet, goals (default: the recipe's)"),
    split: str = typer.Option("auto", help="auto (test split of the training folder, else all), all, train, val, test"),
    overlays: int = typer.Option(8, min=-1, help="overlay pictures in the report (worst and best cases); 0 for "
                                 "none, -1 for all"),
    batch_size: int = typer.Option(8, min=1, help="images per batch (tiles per batch with --tile)"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    level: Optional[int] = typer.Option(None, help="prune a deeply supervised network to this level first "
                                        "(ANU-Net L1-L4)"),
    precision: str = typer.Option("auto", help="auto (bf16 + channels_last on a CPU with BF16 instructions, mixed "
                                  "on CUDA, else fp32), 32, bf16-mixed, 16-mixed"),
    spacing: Optional[str] = typer.Option(None, help=SPACING_HELP),
    ensemble: list[Path] = typer.Option([], "--ensemble", help="another run (or model folder) whose probabilities are "
                                        "averaged with RUN's, e.g. a study's other folds (repeatable)"),
    tile: Optional[str] = typer.Option(None, help="sliding windows at native resolution: tile size 256 or HxW, or "
                                       "off (default: the training crop for a network trained on crops, else off)"),
    overlap: Optional[float] = typer.Option(None, help="tile overlap, a fraction in [0, 1) (default 0.5)"),
    tta: str = typer.Option("none", help="test-time augmentation: none, or flips (the 4 flip combinations averaged)"),
    threshold: Optional[float] = typer.Option(None, help="binary decision threshold of the label metrics (default: "
                                              "the one `medseg tune-threshold` stored in the model folder, else the "
                                              "protocol's 0.5)"),
    largest_component: Optional[bool] = typer.Option(None, "--largest-component/--no-largest-component",
                                                     help=LARGEST_HELP + RECIPE_DEFAULT),
    min_size: Optional[int] = typer.Option(None, min=0, help=MIN_SIZE_HELP + RECIPE_DEFAULT),
    fill_holes: Optional[bool] = typer.Option(None, "--fill-holes/--no-fill-holes",
                                              help=FILL_HOLES_HELP + RECIPE_DEFAULT),
    labels: Optional[str] = typer.Option(None, help="volumes: reference labels merged as one foreground, e.g. 1,2 "
                                         "(default: every label > 0 for a binary model, label k for class k)"),
    per_slice: bool = typer.Option(False, "--per-slice", help="volumes: also per_slice.csv (Dice, IoU per slice)"),
) -> None:
    """Score a run: per_case.csv, summary.json (naming the protocol), report.md and overlays. A --data folder of
    volume pairs (images/ + labels/, as `medseg slices` reads) is scored per volume: per_volume.csv, HD95 in mm.

    Example: medseg evaluate runs/unet-kvasir_seg --data ../shared/data/kvasir_seg
    """
    from medseg.engine.evaluate import evaluate
    from medseg.engine.postprocess import from_flags
    from medseg.engine.run import Run

    postprocessing = None  # None: the recipe's eval.postprocess, read by evaluate after its checks of the run
    if (largest_component, min_size, fill_holes) != (None, None, None):
        recipe = Run(run).require().recipe().eval.postprocess.model_dump()
        postprocessing = from_flags(largest_component, min_size, fill_holes, recipe)
    folder = evaluate(run, data, protocol, split, batch_size, device, overlays, level=level, precision=precision,
                      spacing=spacing, ensemble=ensemble, tile=tile, overlap=overlap, tta=tta, threshold=threshold,
                      postprocessing=postprocessing, labels=labels, per_slice=per_slice)
    _print_summary(folder)


def _print_summary(folder: Path) -> None:
    """The metrics table of an evaluate or score report folder, and where its report is."""
    summary = json.loads((folder / "summary.json").read_text())
    table = Table(title=f"{summary['cases']} cases, protocol {summary['protocol']['name']}")
    table.add_column("metric")
    table.add_column("value")
    for metric, values in summary["metrics"].items():
        table.add_row(metric, f"{values['value']:.4f}")
    console.print(table)
    console.print(f"report: [bold]{folder / 'report.md'}[/]")


@app.command("score")
def score_command(
    predictions: Path = typer.Argument(..., help="folder of predictions: <stem>.png masks and/or <stem>_prob.png "
                                       "maps (as `medseg predict --probabilities` writes), TIFF or NPY"),
    data: Path = typer.Option(..., help="data folder whose masks are the reference"),
    protocol: Optional[str] = typer.Option(None, help="metric protocol: paper (default), nnunet, pooled, pranet, "
                                           "m2snet, infnet, goals"),
    split: str = typer.Option("all", help="all, or train, val, test of --splits"),
    splits: Optional[Path] = typer.Option(None, help="splits.json that --split refers to (default DATA/splits.json; "
                                          "e.g. RUN/splits.json)"),
    spacing: Optional[str] = typer.Option(None, help=SPACING_HELP),
    num_classes: Optional[int] = typer.Option(None, min=1, help="classes of the task (default: the model named in "
                                              "PREDICTIONS/predict.json, else 1 = binary)"),
    overlays: int = typer.Option(8, min=-1, help="overlay pictures in the report (worst and best cases); 0 for "
                                 "none, -1 for all"),
    out: Optional[Path] = typer.Option(None, help="report folder (default PREDICTIONS/score)"),
) -> None:
    """Score a folder of predicted masks or probability maps against a data folder's masks: the same per_case.csv,
    summary.json and report.md as evaluate.

    Example: medseg score predictions --data ../shared/data/kvasir_seg --protocol nnunet
    """
    from medseg.engine.score import score

    folder = score(predictions, data, protocol, split, splits, spacing, out, num_classes, overlays)
    _print_summary(folder)


@app.command("predict")
def predict_command(
    run: Path = typer.Argument(..., help="run folder, model folder, or ONNX folder from `medseg export`"),
    inputs: list[str] = typer.Argument(..., help="image files, folders or glob patterns"),
    out: Path = typer.Option(..., help="output folder"),
    overlay: bool = typer.Option(False, help="also write <stem>_overlay.png"),
    probabilities: bool = typer.Option(False, help="also write <stem>_prob.png (probability x 255, rounded)"),
    native: bool = typer.Option(False, help="run at each image's own size instead of the training size"),
    threshold: Optional[float] = typer.Option(None, help="binary decision threshold on the probability, strictly "
                                              "between 0 and 1 (default: the one `medseg tune-threshold` stored in "
                                              "the model folder, else 0.5)"),
    largest_component: bool = typer.Option(False, "--largest-component", help=LARGEST_HELP),
    min_size: int = typer.Option(0, min=0, help=MIN_SIZE_HELP),
    fill_holes: bool = typer.Option(False, "--fill-holes", help=FILL_HOLES_HELP),
    batch_size: int = typer.Option(8, min=1, help="images per batch (tiles per batch with --tile)"),
    device: str = typer.Option("auto"),
    level: Optional[int] = typer.Option(None, help="prune a deeply supervised network to this level (ANU-Net L1-L4)"),
    save_attention: bool = typer.Option(False, help="write first-layer attention coefficients as "
                                        "<stem>_attention_*.png"),
    precision: str = typer.Option("auto", help="auto (bf16 + channels_last on a CPU with BF16 instructions, mixed "
                                  "on CUDA, else fp32), 32, bf16-mixed, 16-mixed"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="predict the good inputs and list the bad ones (default: "
                                  "refuse, naming every bad input, before writing anything)"),
    ensemble: list[Path] = typer.Option([], "--ensemble", help="another run (or model folder) whose probabilities are "
                                        "averaged with RUN's, e.g. a study's other folds (repeatable)"),
    tile: Optional[str] = typer.Option(None, help="sliding windows at native resolution: tile size 256 or HxW, or "
                                       "off (default: the training crop for a network trained on crops, else off)"),
    overlap: Optional[float] = typer.Option(None, help="tile overlap, a fraction in [0, 1) (default 0.5)"),
    tta: str = typer.Option("none", help="test-time augmentation: none, or flips (the 4 flip combinations averaged)"),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="for a DICOM series: also write <stem>.seg.dcm, a DICOM "
                                   "SEG referencing the source series"),
    series: Optional[str] = typer.Option(None, help="the SeriesInstanceUID to read where a DICOM folder holds several"),
) -> None:
    """Predict masks for images of any size; masks are written at each input's size. Volumes (NIfTI, NRRD, MHA/MHD,
    DICOM series folders) of a network trained on `medseg slices` output are cut as its slices were and give
    <stem>.nii.gz label volumes on the input's grid. Every input is checked first; OUT/predict.json lists inputs,
    outputs, skipped inputs and settings, and says "complete": true only when every output is written.

    Example: medseg predict runs/unet-kvasir_seg photo.jpg scans/ --out predictions --overlay
    Example: medseg predict runs/unet-liver ct/case07.nii.gz dicom/patient3/ --out seg --dicom-seg
    """
    from medseg.engine.postprocess import PostProcessing
    from medseg.engine.predict import MANIFEST, predict
    from medseg.engine.volume_predict import predict_volumes, volume_inputs

    postprocessing = PostProcessing(largest_component, min_size, fill_holes)
    volumes = volume_inputs(inputs)
    if volumes:
        unused = [name for name, given in (("--overlay", overlay), ("--save-attention", save_attention),
                                           ("--skip-bad", skip_bad)) if given]
        if unused:
            raise MedsegError(f"{unused[0]} is for 2D images; volumes give label volumes (and --probabilities maps)")
        manifest = predict_volumes(run, volumes, out, probabilities, threshold, batch_size, device, level, precision,
                                   ensemble=ensemble, tile=tile, overlap=overlap, tta=tta, native=native,
                                   postprocessing=postprocessing, dicom_seg=dicom_seg, series=series)
        console.print(Text(f"wrote {len(volumes)} label volume(s) to {out}; manifest {out / MANIFEST}"),
                      soft_wrap=True)
        return
    if dicom_seg or series:
        raise MedsegError("--dicom-seg and --series are for DICOM series folders; the inputs are 2D images")
    manifest = predict(run, inputs, out, overlay, probabilities, native, threshold, batch_size, device, level,
                       save_attention, precision, skip_bad, ensemble=ensemble, tile=tile, overlap=overlap, tta=tta,
                       postprocessing=postprocessing)
    masks = len(manifest["inputs"])
    console.print(Text(f"wrote {masks} mask(s) to {out}; manifest {out / MANIFEST}"), soft_wrap=True)
    for skipped in manifest["skipped"]:
        console.print(Text(f"skipped {skipped['input']}: {skipped['reason']}"), soft_wrap=True)


@app.command("tune-threshold")
def tune_threshold_command(
    run: Path = typer.Argument(..., help="run folder written by `medseg train` (binary network)"),
    data: Optional[Path] = typer.Option(None, help="the data folder the run was trained on, where it is now "
                                        "(default: from the run's config.yaml)"),
    metric: str = typer.Option("dice", help="label metric to maximise: dice or iou (aggregation and empty-mask rule "
                               "of the run's protocol)"),
    grid: str = typer.Option("0.05..0.95 step 0.05", help="thresholds to try: START..STOP step STEP, or a comma "
                             "list such as 0.3,0.4,0.5"),
    batch_size: int = typer.Option(8, min=1),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    precision: str = typer.Option("auto", help="auto, 32, bf16-mixed, 16-mixed (as evaluate)"),
) -> None:
    """Tune the binary decision threshold on the run's validation split and store the best in
    RUN/model/threshold.json; predict and evaluate then use it unless --threshold is given.

    Example: medseg tune-threshold runs/unet-kvasir_seg --metric dice
    """
    from medseg.engine.threshold import tune_threshold

    record = tune_threshold(run, data, metric, grid, batch_size, device, precision)
    table = Table(title=f"{record['metric']} on {record['cases']} val cases")
    table.add_column("threshold")
    table.add_column(record["metric"])
    for row in record["grid"]:
        value = row[record["metric"]]
        best = row["threshold"] == record["threshold"]
        table.add_row(f"{row['threshold']:g}" + (" *" if best else ""), "-" if value is None else f"{value:.4f}",
                      style="bold" if best else None)
    console.print(table)
    console.print(Text(f"threshold {record['threshold']:g} ({record['metric']} {record['score']:.4f}) stored in "
                       f"{record['file']}; predict and evaluate use it unless --threshold "
                       "is given"), soft_wrap=True)


@app.command("serve")
def serve_command(
    run: Path = typer.Argument(..., help="run folder or model folder"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every network interface)"),
    port: int = typer.Option(7860, min=1, max=65535),
    device: str = typer.Option("auto"),
    threshold: Optional[float] = typer.Option(None, help="the slider's starting threshold (default: the model's "
                                              "tuned threshold, else 0.5)"),
    precision: str = typer.Option("auto", help="as for predict: auto, 32, bf16-mixed, 16-mixed"),
) -> None:
    """A local web viewer for one model: drop an image, see the probability map and the mask over the image, move
    the threshold, download the mask (the one `medseg predict` writes). Runs until Ctrl-C; needs the serve extra.

    Example: medseg serve runs/unet-kvasir_seg --port 7860
    """
    from medseg.engine.serve import Viewer

    viewer = Viewer(run, device, precision, threshold)
    url = viewer.launch(host, port)
    console.print(Text(f"serving {viewer.predictor.folder} at {url} (Ctrl-C stops)"), soft_wrap=True)
    viewer.wait()


@app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="run folder or model folder"),
    fmt: str = typer.Option(..., "--format", help="onnx (model.onnx, runs with onnxruntime; `medseg predict` "
                               "takes the folder) or torchscript (model.pt)"),
    out: Path = typer.Option(..., help="output folder: new, empty, or an earlier export (replaced)"),
    dynamic: bool = typer.Option(False, "--dynamic", help="accept any height and width (multiples of the network's "
                                 "size multiple) instead of the training size only"),
    opset: Optional[int] = typer.Option(None, min=7, help="ONNX opset (default: the exporter's)"),
    level: Optional[int] = typer.Option(None, help="export a deeply supervised network pruned to this level "
                                        "(ANU-Net L1-L4)"),
    exporter: str = typer.Option("auto", help="ONNX exporter: auto (torch's dynamo exporter, else the "
                                 "TorchScript-based one), dynamo, torchscript"),
) -> None:
    """Export a saved network with its activation (outputs are probabilities) as ONNX or TorchScript, plus
    medseg-export.json (preprocessing, input/output names and layouts, source, versions, parity). The file is
    checked against PyTorch first; on a mismatch nothing is written.

    Example: medseg export runs/unet-kvasir_seg --format onnx --dynamic --out exports/unet-kvasir
    """
    from medseg.engine.export import export

    sidecar = export(run, fmt, out, dynamic, opset, level, exporter)
    parity = sidecar["parity"]
    console.print(Text(f"wrote {out / sidecar['file']} ({sidecar['exporter']}) and {out / 'medseg-export.json'}; "
                       f"parity on {parity['compared']} probabilities: max error {parity['max_abs_error']:.2g} "
                       f"(allowed {parity['atol']:g} + {parity['rtol']:g} x |p|)"), soft_wrap=True)


benchmark_app = typer.Typer()  # help: the callback's docstring
app.add_typer(benchmark_app, name="benchmark")


@benchmark_app.callback(invoke_without_command=True)
def benchmark_command(
    ctx: typer.Context,
    models: str = typer.Option("unet", help="comma-separated model names (random init); options as name:key=value"),
    num_classes: int = typer.Option(1, min=1, help="output channels of the benchmarked networks"),
    size: Optional[int] = typer.Option(None, help="square input size (default 352; with --run, the run's size)"),
    batch: int = typer.Option(8, min=1, help="the batch size N for the batch-N latency and throughput"),
    levels: Optional[str] = typer.Option(None, help="pruning levels of deeply supervised networks, e.g. 1,2,3,4"),
    run: Optional[Path] = typer.Option(None, help="benchmark this trained run's network instead of --models"),
    data: Optional[Path] = typer.Option(None, help="with --run: also score each level on this data (Dice, IoU); "
                                        "with --train: train on this folder's loader instead of synthetic batches"),
    device: str = typer.Option("auto"),
    warmup: int = typer.Option(3, min=0),
    repeats: int = typer.Option(10, min=1),
    in_channels: int = typer.Option(3, min=1),
    amp: bool = typer.Option(False, help="autocast (CUDA only)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON"),
    markdown: bool = typer.Option(False, help="also print a markdown table (for docs/BENCHMARKS.md)"),
    fovea_pool: bool = typer.Option(False, "--fovea-pool", hidden=True,
                                    help="deprecated: use `medseg benchmark fovea-pool`"),
    train: bool = typer.Option(False, "--train", help="training throughput in medseg's engine against a bare loop "
                               "(same network, loss, optimiser, tensors), per --precisions"),
    precisions: str = typer.Option("32,bf16-mixed", help="with --train: precisions to measure (auto, 32, "
                                   "bf16-mixed, 16-mixed)"),
    steps: int = typer.Option(6, min=1, help="with --train: timed steps (after --warmup ones)"),
    rounds: int = typer.Option(2, min=1, help="with --train: rounds of engine and bare loop, alternating which "
                               "goes first (ABBA), steps pooled: keeps machine drift out of the ratio"),
) -> None:
    """Parameters, GFLOPs (GMACs = GFLOPs / 2), latency and throughput at batch 1 and N, peak memory;
    per pruning level with --levels, and with --run RUN --data DATA each level's Dice and IoU.
    `medseg benchmark fovea-pool` times Fovea-UNet's Fovea Pooling instead.

    Example: medseg benchmark --models unet --size 352
    Example: medseg benchmark --models stsnet,stsnet:decoder=unet:attention=none --size 512 --num-classes 2
    Example: medseg benchmark fovea-pool
    Example: medseg benchmark --train --models unet,m2snet --size 128 --batch 8 --json train.json
    Example: medseg benchmark --train --models unet --data ../shared/data/kvasir_seg --precisions auto
    """
    if ctx.invoked_subcommand is not None:
        return
    if json_out:
        check_output_file(json_out, "--json")  # before minutes of measuring, not after
    if train:
        _benchmark_training(models, size or 128, batch, device, precisions, warmup, steps, rounds, in_channels,
                            data, json_out, markdown)
        return
    from medseg.engine.benchmark import benchmark, benchmark_run, markdown_table, parse_model_spec
    from medseg.models import model_info

    if fovea_pool:
        print("note: --fovea-pool is deprecated; use `medseg benchmark fovea-pool`", file=sys.stderr)
        _benchmark_fovea_pool(size or 512, device, repeats, json_out)
        return

    level_list = _int_list(levels, "--levels")
    if data is not None and run is None:
        raise MedsegError("--data scores a trained network: give --run RUN as well")
    names = [m.strip() for m in models.split(",") if m.strip()]
    if run is None:
        for spec in names:
            model_info(parse_model_spec(spec)[0])  # unknown names fail before any timing
    table = Table(title=f"batch 1 and {batch}")
    columns = ["model", "input", "params", "GFLOPs", "GMACs", "ms b1", "img/s b1", f"ms b{batch}", f"img/s b{batch}",
               "peak MB"]
    for column in columns + (["Dice", "IoU"] if data else []):
        table.add_column(column, justify="right")

    def add(r: dict) -> None:
        peak = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        cells = [r["model"], r["input"], f"{r['params']:,}", f"{r['gflops']:.2f}", f"{r['gmacs']:.2f}",
                 f"{r['latency_ms_b1']:.1f}", f"{r['throughput_b1']:.2f}", f"{r['latency_ms_bn']:.1f}",
                 f"{r['throughput_bn']:.2f}", peak]
        table.add_row(*cells, *([f"{r['dice']:.4f}", f"{r['iou']:.4f}"] if "dice" in r else []))

    with console.status("benchmarking ..."):
        if run is not None:
            square = (size, size) if size else None
            report = benchmark_run(run, level_list or [None], square, data, batch, device, warmup, repeats, amp,
                                   on_result=add)
        else:
            report = benchmark(names, (size or 352, size or 352), batch, device, warmup, repeats, in_channels,
                               num_classes, amp=amp, levels=level_list, on_result=add)
    _show_report(table, report, f"GMACs = multiply-accumulates = GFLOPs / 2; peak memory: "
                 f"{report['results'][0]['peak_memory_kind']}", json_out, markdown_table(report) if markdown else None)


def _show_report(table: Table, report: dict, note: str, json_out: Optional[Path], markdown: Optional[str]) -> None:
    """A benchmark's table, the machine line, and the JSON file and markdown table when asked for."""
    from medseg.engine.benchmark import write_json

    console.print(table)
    m = report["machine"]
    console.print(f"device {report['device']} ({m['gpu'] or m['cpu']}, {m['torch_threads']} threads), "
                  f"torch {m.get('torch')}, {report['date']}; {note}")
    if json_out:
        write_json(report, json_out)
        console.print(f"results: {json_out}")
    if markdown:
        print(markdown)


def _benchmark_training(models: str, size: int, batch: int, device: str, precisions: str, warmup: int, steps: int,
                        rounds: int, in_channels: int, data: Optional[Path], json_out: Optional[Path],
                        markdown: bool) -> None:
    from medseg.engine.benchmark import parse_model_spec
    from medseg.engine.precision import PRECISIONS
    from medseg.engine.train_benchmark import benchmark_training, training_markdown
    from medseg.models import model_info

    names = [m.strip() for m in models.split(",") if m.strip()]
    for spec in names:
        model_info(parse_model_spec(spec)[0])  # unknown names fail before any timing
    chosen = tuple(p.strip() for p in precisions.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PRECISIONS]
    if unknown or not chosen:
        raise MedsegError(f"--precisions: {', '.join(unknown) or 'none given'}; choose from {', '.join(PRECISIONS)}")
    table = Table(title=f"training, batch {batch}, {size}x{size}, median of {rounds} x {steps} steps (ABBA rounds)")
    for column in ("model", "precision", "memory format", "engine img/s", "bare img/s", "engine/bare"):
        table.add_column(column, justify="right")

    def add(r: dict) -> None:
        table.add_row(r["model"], r["precision"], r["memory_format"], f"{r['train_img_s']:.2f}",
                      f"{r['raw_img_s']:.2f}", f"{r['ratio']:.2f}")

    with console.status("training ..."):
        report = benchmark_training(names, size, batch, device, chosen, max(1, warmup), steps, in_channels, data,
                                    rounds, on_result=add)
    source = f"{data}'s training loader, cache filled" if data else "synthetic batches"
    _show_report(table, report, source, json_out, training_markdown(report) if markdown else None)


@benchmark_app.command("fovea-pool")
def fovea_pool_command(
    size: int = typer.Option(512, min=8, help="square input size of the fovea_unet forward pass (a multiple of 8)"),
    device: str = typer.Option("auto"),
    repeats: int = typer.Option(3, min=1, help="timed runs of each measurement"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON"),
) -> None:
    """Fovea-UNet's Fovea Pooling (summed-area table) timed against the per-pixel loop of its definition on a
    16x128x128 map with R 16, their largest difference, and the share of a fovea_unet forward pass at --size
    spent in the importance modules and in the pooling.

    Example: medseg benchmark fovea-pool --size 512 --repeats 3 --json fovea_pool.json
    """
    if json_out:
        check_output_file(json_out, "--json")
    _benchmark_fovea_pool(size, device, repeats, json_out)


def _benchmark_fovea_pool(size: int, device: str, repeats: int, json_out: Optional[Path]) -> None:
    from medseg.engine.benchmark import write_json
    from medseg.engine.fovea import benchmark_fovea_pool

    with console.status("benchmarking Fovea Pooling ..."):
        result = benchmark_fovea_pool(network_size=size, device=device, repeats=repeats)
    for key, value in result.items():
        if key != "machine":
            console.print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    if json_out:
        write_json(result, json_out)
        console.print(f"results: {json_out}")


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise MedsegError(f"{option} takes comma-separated integers, e.g. 1,2,3,4; got {text!r}") from None


weights_app = typer.Typer(no_args_is_help=True, help="Local pretrained weight files: which to bring, what one holds.")
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list_command() -> None:
    """For each pretrained slot (an encoder, LossNet's VGG-16): the networks that take it, the recipe key that
    names the file, and the one Python line that saves the file on a machine with internet.

    Example: medseg weights list
    """
    from medseg.engine.weight_files import weight_slots

    for slot in weight_slots():
        console.print(f"[bold]{slot.card.label}[/bold]: {', '.join(slot.used_by)}  ({slot.key})", highlight=False)
        print(f"  {slot.save_line}")


@weights_app.command("inspect")
def weights_inspect_command(
    file: Path = typer.Argument(..., help="a .safetensors, .pth or .ckpt file"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report as JSON"),
) -> None:
    """What a local weights file holds (format, tensors, parameters) and which medseg slots or networks it fits,
    matched by name and shape by the rule loading applies: "full" means loading it will succeed.

    Example: medseg weights inspect res2net50d.pth
    """
    from medseg.engine.benchmark import write_json
    from medseg.engine.weight_files import inspect_file

    if json_out:
        check_output_file(json_out, "--json")
    report = inspect_file(file)
    prefixes = ", ".join(f"{k} ({n})" for k, n in list(report["prefixes"].items())[:12])
    more = len(report["prefixes"]) - 12
    console.print(f"{report['file']}: {report['format']}, {report['tensors']} tensors, "
                  f"{report['parameters']:,} values in floating-point tensors ({', '.join(report['dtypes'])})\n"
                  f"top-level names: {prefixes}{f' and {more} more' if more > 0 else ''}", highlight=False)
    full = [m for m in report["matches"] if m["status"] == "full"]
    # without a full match, the closest partial ones say what is wrong with the file
    fits = full or sorted((m for m in report["matches"] if m["status"] == "partial"),
                          key=lambda m: -m["matched"] / m["needed"])[:3]
    for match in fits:
        if match["status"] == "full":
            line = (f"full match: {match['slot']} ({match['matched']} tensors; {match['unused']} of the file's "
                    f"unused) -> {', '.join(match['used_by'])} with {match['key']}")
        else:
            line = (f"partial: {match['slot']}, {match['matched']} of {match['needed']} tensors; first problem "
                    f"{match['first_problem']} (loading refuses it)")
        console.print(line, highlight=False)
    if not fits:
        console.print("fits none of medseg's slots: no tensor matches by name and shape (`medseg weights list` "
                      "says which file each slot takes)", highlight=False)
    if json_out:
        write_json(report, json_out)
        console.print(f"results: {json_out}")


analyze_app = typer.Typer(no_args_is_help=True, help="Look inside a trained network.")
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("cka")
def cka_command(
    run: Path = typer.Argument(..., help="run folder or model folder"),
    data: Path = typer.Option(..., help="data folder whose images are fed through the network"),
    layer: Optional[str] = typer.Option(None, help="module name of a conv layer, e.g. encoder.stages.1.0.0.ghost1."
                                        "primary_conv (default: the first layer the network names, e.g. Fovea-UNet's "
                                        "first Ghost module's intrinsic features; required for other networks)"),
    out: Optional[Path] = typer.Option(None, help="PNG to write (default RUN/analysis/cka-LAYER.png)"),
    images: int = typer.Option(32, min=2, help="how many images (the first, by name)"),
    device: str = typer.Option("auto"),
) -> None:
    """Linear CKA between the channels of one layer of any network as a heat map PNG (Fovea-UNet Fig. 5), plus
    the matrix as .npy and the mean off-diagonal similarity. --layer defaults to the first layer the network
    names (Fovea-UNet: its Ghost modules' intrinsic features); other networks need it.

    Example: medseg analyze cka runs/fovea_unet-kvasir_seg --data ../shared/data/kvasir_seg
    Example: medseg analyze cka runs/unet-kvasir_seg --data ../shared/data/kvasir_seg --layer encoder.3.1.0
    """
    from medseg.engine.analyze import cka

    path, mean = cka(run, data, layer, out, images, device)
    console.print(f"mean off-diagonal CKA {mean:.4f}; heat map {path}")


@app.command("amplify")
def amplify_command(
    data: Path = typer.Argument(..., help="data folder (folder format); with splits.json only its train stems "
                                "are amplified"),
    out: Path = typer.Option(..., help="new folder: the originals plus the amplified views"),
    method: int = typer.Option(4, min=1, max=4, help="paper Table 7: 1 = four standard views under N1, 2 = under "
                               "N2, 3 = 2 plus a further crop of views still under N2, 4 = 2 plus a lesion-centred "
                               "crop (the paper's STS-Net)"),
    size: int = typer.Option(512, min=8, help="training size: lesion pixels, N1, N2 and the border are counted "
                             "on masks resized to SIZE x SIZE"),
    n1: Optional[int] = typer.Option(None, help="threshold N1 (method 1's limit; default computed)"),
    n2: Optional[int] = typer.Option(None, help="threshold N2: images with 5 < lesion pixels < N2 qualify "
                                     "(default computed, or from --n1 by Eq. 2)"),
    seed: int = typer.Option(0),
    border: int = typer.Option(50, help="border crop in training-size pixels"),
) -> None:
    """STS-Net's amplification blocks (paper Table 7): extra views (flips, border crops, a lesion-centred
    crop) of every training image whose lesion is small at the training size (5 < pixels < N2, or N1 for
    method 1; N1 and N2 from the training masks). Writes OUT/amplify.json.

    Example: medseg amplify ../shared/data/dsb2018_nuclei --out dsb2018_amplified
    Example: medseg amplify ../shared/data/dsb2018_nuclei --out dsb2018_m3 --method 3 --size 256
    """
    from medseg.data.amplify import amplify_folder

    with console.status(f"amplifying {data} ..."):
        record = amplify_folder(data, out, n1, n2, seed, border, method, size)
    t = record["thresholds"]
    console.print(f"method {method}: {record['description']}")
    console.print(f"N1 {t['n1']}, N2 {t['n2']} at {size}x{size} ({t['source']}; A = {t['lesion_images']} images "
                  f"with a lesion, S = {t['lesion_pixels']} lesion pixels)")
    console.print(f"{record['qualifying_images']} of {record['training_images']} training images qualify "
                  f"({record['rule']}); {record['new_images']} views written; {out} holds "
                  f"{len(list((out / 'images').iterdir()))} images; manifest {out / 'amplify.json'}")


@app.command("slices")
def slices_command(
    volumes: Path = typer.Argument(..., help="folder of volume pairs (NIfTI, NRRD, MHA/MHD; an image may be a DICOM "
                                   "series folder): images/ + labels/, or nnU-Net imagesTr/ + labelsTr/"),
    out: Path = typer.Option(..., help="new data folder (images/ + masks/)"),
    window: Optional[str] = typer.Option(None, help="intensity window LO,HI (e.g. -200,200 HU); default "
                                         "per-volume min-max"),
    mode: str = typer.Option("stack", help="stack: slices (k-1, k, k+1) as 3 channels (STS-Net paper); sum: their "
                             "pixel sum (STS-Net code); single: slice k alone, one gray channel (ANU-Net)"),
    edge: str = typer.Option("triple", help="2.5D image of the first/last slice: triple: the edge slice three times "
                             "(STS-Net Fig. 2); repeat: the edge slice twice and its one neighbour"),
    single: bool = typer.Option(False, "--single", help="the same as --mode single"),
    only_lesion: bool = typer.Option(False, help="keep only slices whose label has foreground"),
    keep_labels: bool = typer.Option(False, help="keep integer labels instead of 0/255 masks"),
    series: Optional[str] = typer.Option(None, help="the DICOM series UID to read where an image folder holds several"),
) -> None:
    """Slices from 3D volumes: one PNG image/mask pair per slice, 2.5D (STS-Net) or single (ANU-Net).

    Example: medseg slices volumes/ --out slices --window=-200,200 --only-lesion
    """
    from medseg.data.volumes import make_slices

    if single and mode not in ("stack", "single"):  # stack: the default, not a choice
        raise MedsegError(f"--single writes one-channel slices; it contradicts --mode {mode}: give one of them")
    mode = "single" if single else mode
    bounds = None
    if window:
        try:
            low, high = (float(v) for v in window.split(","))
        except ValueError:
            raise MedsegError(f"--window takes LO,HI, e.g. --window=-200,200; got {window!r}") from None
        bounds = (low, high)
    with console.status(f"slicing {volumes} ..."):
        record = make_slices(volumes, out, bounds, mode, only_lesion, keep_labels, edge, series)
    edges = f", edges {edge}" if record["edge"] else ""
    console.print(f"{record['slices']} slices from {record['volumes']} volumes written to {out} (mode {mode}{edges}, "
                  f"window {record['window']}; {record['skipped_without_lesion']} slices without lesion skipped)")


@app.command("study")
def study_command(
    study: Optional[str] = typer.Argument(None, help="a study YAML file or a shipped study name (see --list)"),
    data: list[Path] = typer.Option([], help="training data folder(s), replacing the study's data.train"),
    test: list[Path] = typer.Option([], help="extra test data folder(s) scored whole, replacing data.test"),
    out: Path = typer.Option(Path("studies"), help="folder that holds study folders"),
    executor: str = typer.Option("local", help="local (one process per run) or ray (one Ray task per run)"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local Ray)"),
    jobs: int = typer.Option(1, min=1, help="local executor: runs at the same time"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads per run (default: the cores / --jobs); "
                                          "a Ray task asks for that many CPUs"),
    dry_run: bool = typer.Option(False, help="print the cells, their state and the work, train nothing"),
    cpu: bool = typer.Option(False, help="the study's laptop-sized variant (its `cpu:` section)"),
    report: Optional[Path] = typer.Option(None, help="re-aggregate this study folder without training"),
    list_: bool = typer.Option(False, "--list", help="list the shipped studies"),
) -> None:
    """Run a comparison study: models x datasets x seeds x folds, each cell an ordinary run, scored on its
    held-out cases and extra test sets; results.csv, summary.csv, report.md (paired Wilcoxon tests against the
    reference, Holm-corrected) and plots/. Re-running finishes only what is missing.

    Example: medseg study anunet-table2 --data ../shared/data/kvasir_seg --cpu
    """
    from medseg.engine.study import aggregate_study, list_studies, run_study

    if list_:
        for name in list_studies():
            console.print(name)
        return
    if report is not None:
        for written in aggregate_study(report):
            console.print(f"report: [bold]{written}[/]")
        return
    if study is None:
        raise MedsegError("give a study file or name (medseg study --list shows the shipped ones), or --report DIR")
    plan = run_study(study, out, [str(d) for d in data] or None, [str(t) for t in test] or None, executor, address,
                     jobs, dry_run, cpu, threads, report=lambda line: console.print(Text(line), soft_wrap=True))
    if any(cell.state == "failed" for cell in plan.cells):
        raise typer.Exit(1)  # the report is written without the failed cells; each failure was named above


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("medseg-demo"), help="folder for the phantom data and the run"),
    epochs: int = typer.Option(25, min=1),
) -> None:
    """Generate the synthetic phantom set, train U-Net on the CPU, evaluate, and name the report.

    Example: medseg demo
    """
    from medseg.engine.demo import demo, summary_line

    console.print("medseg demo: SYNTHETIC phantom data (generated, not patient images), U-Net on this machine")
    folder = demo(out, epochs=epochs)
    console.print(summary_line(folder))
    console.print(f"report: [bold]{folder / 'report.md'}[/]")


INTERRUPTED = 130  # the shell's exit status of a command stopped by Ctrl-C


def main() -> None:
    """Run the command line: a user error (a MedsegError, or a usage mistake click finds: an unknown option, a
    missing argument, a value of the wrong type) is one `error:` line and exit status 2, never a traceback or a
    boxed panel. click runs outside its standalone mode so that its usage errors reach this function."""
    from typer._click import exceptions as click  # typer (>= 0.29, pyproject) carries its own copy of click

    try:
        code = app(standalone_mode=False)  # --help and --version return 0; `raise typer.Exit(n)` returns n
    except MedsegError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        sys.exit(2)
    except click.NoArgsIsHelpError as exc:  # `medseg` or `medseg analyze` alone: the help, as before
        if exc.format_message().strip():  # rich help is printed while the error is made; plain help is its text
            print(exc.format_message())
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path if exc.ctx else 'medseg'} --help`)"
        print(f"error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):  # typer's own Abort: its copy of click has none
        code = INTERRUPTED
    if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into this exit status
        print("interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
