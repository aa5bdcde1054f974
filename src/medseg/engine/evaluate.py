"""`medseg evaluate`: score a run on a data folder under a named metric protocol.

Writes RUN/eval/<data>[-<split>]/ atomically: per_case.csv (one row per image), summary.json (the
protocol with its full definition, the numbers, what was scored), report.md (the table, best and worst
cases) and overlays/ (prediction tinted red, annotation outlined green), through `medseg.engine.score`, which
writes the same report for a folder of predictions. Probabilities are resized back to each mask's original size
before thresholding, so scores are at annotation resolution.

Inference is planned as predict plans it (medseg.engine.inference: tiles, flips, an ensemble); summary.json
records the plan, and a plan other than the model's default gets a folder of its own (e.g.
`<data>-resized`, `<data>-tile256x256-o0.5`, `<data>-tta`, `<data>-ensemble3`) so modes never overwrite each
other's numbers.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from medseg.data.check import check_data
from medseg.data.dataset import collate_inference, load_image_tensor, load_labels
from medseg.data.formats import Case, discover
from medseg.data.splits import cases_for
from medseg.data.volumes import is_volume_folder
from medseg.engine.inference import InferencePlan, build_plan, inference_dataset, stored_tiling
from medseg.engine.postprocess import FROM_OPTION, TUNED, PostProcessing, choose_threshold
from medseg.engine.predict import check_threshold
from medseg.engine.run import Run, slug
from medseg.engine.score import (
    case_spacing,
    model_record,
    overlay_cases,
    parse_spacing,
    report_record,
    spacing_record,
    write_overlay,
    write_report,
)
from medseg.engine.train import default_workers
from medseg.errors import MedsegError
from medseg.files import atomic_folder, check_output_folder, user_write_errors
from medseg.metrics import get_protocol, predict_labels
from medseg.progress import Progress

SPLITS = ("auto", "all", "train", "val", "test")
MOVE_ASIDE = "move it aside: evaluate writes its results in the run folder's eval/"


def select_cases(run: Run, data: Path, split: str) -> tuple[list[Case], str]:
    layout = discover(data)
    trained_on = run.data_root().resolve()
    if split == "auto":
        split = "test" if data.resolve() == trained_on else "all"
    if split == "all":
        return layout.cases + layout.test_cases, split
    if data.resolve() != trained_on:
        raise MedsegError(f"--split {split} refers to the run's splits of {trained_on}, but --data is {data}; "
                          "use --split all for another dataset")
    stems = run.splits()[split]
    if not stems:
        raise MedsegError(f"the run's {split} split is empty; choose another --split")
    return cases_for(layout, stems), split


def evaluate(run_path: str | Path, data: str | Path | None = None, protocol: str | None = None, split: str = "auto",
             batch_size: int = 8, device: str = "auto", overlays: int = 8, workers: int | None = None,
             level: int | None = None, precision: str = "auto", spacing: str | None = None, *,
             ensemble: list[str | Path] = (), tile: str | None = None, overlap: float | None = None,
             tta: str = "none", threshold: float | None = None, postprocessing: PostProcessing | None = None,
             labels: str | None = None, per_slice: bool = False) -> Path:
    """Score the run's saved model on `data` (default: the folder it was trained on; pruned to `level` if given);
    returns the eval folder. `spacing`: the pixel spacing of the surface metrics (`score.parse_spacing`);
    `ensemble`, `tile`, `overlap` and `tta` plan the inference as in predict. The label metrics use `threshold`
    (None: the model folder's tuned one, else the protocol's) and `postprocessing` (None: the recipe's
    eval.postprocess); map metrics use the probabilities. A folder of volume pairs is scored per volume in mm
    (`medseg.engine.volume_evaluate`, with `labels` and `per_slice`)."""
    from medseg.engine.volume_evaluate import evaluate_volumes  # it imports this module

    run = Run(run_path).require()
    data = Path(data) if data is not None else run.data_root()
    if not data.is_dir():
        raise MedsegError(f"data folder {data} does not exist" + ("" if data != run.data_root() else
                          " (the run was trained on it; give --data where it is now)"))
    if is_volume_folder(data):
        only_2d = {"--protocol": protocol, "--spacing": spacing, "--split": split not in ("auto", "all")}
        for flag in (flag for flag, given in only_2d.items() if given):
            raise MedsegError(f"{flag} applies to 2D data folders, but {data} holds volumes (scored per volume "
                              "with their own voxel spacing, in mm); drop it")
        return evaluate_volumes(run, data, labels, per_slice, batch_size, device, level, precision,
                                ensemble=ensemble, tile=tile, overlap=overlap, tta=tta, threshold=threshold,
                                postprocessing=postprocessing)
    if labels is not None or per_slice:
        raise MedsegError(f"--labels and --per-slice apply to a folder of volume pairs, but {data} is a 2D data "
                          "folder; drop them, or give the volumes the slices were cut from")
    if split not in SPLITS:
        raise MedsegError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if overlays < -1:
        raise MedsegError(f"--overlays takes a count of overlay pictures, 0 for none or -1 for all; got {overlays}")
    if batch_size < 1:
        raise MedsegError(f"--batch-size must be at least 1, got {batch_size}")
    spacing_choice = parse_spacing(spacing)
    if threshold is not None:
        check_threshold(threshold)
    check_output_folder(run.path / "eval", "output folder", MOVE_ASIDE)  # before any work: results go there
    plan = build_plan([run.path, *ensemble], device, level, precision, tile, overlap, tta, batch_size=batch_size)
    predictor = plan.reference
    # a tuned threshold belongs to one network: an ensemble's average is decided at the protocol's threshold
    tuned = predictor.threshold if len(plan.predictors) == 1 else None
    threshold, threshold_source = choose_threshold(threshold, tuned, predictor.num_classes)
    recipe_postprocessing = PostProcessing(**run.recipe().eval.postprocess.model_dump())
    postprocessing = postprocessing or recipe_postprocessing
    # the decided labels replace the protocol's own thresholding only when the decision differs from it
    decided = postprocessing.active or threshold_source in (FROM_OPTION, TUNED)
    default_protocol = run.recipe().eval.protocol
    protocol_def = get_protocol(protocol or default_protocol)
    cases, split = select_cases(run, data, split)
    scorer = protocol_def.scorer(predictor.num_classes)
    stems, sizes, pixels, used = [], [], [], []
    by_stem = {c.stem: c for c in cases}
    for stem, size, resized, mask in case_probabilities(plan, data, cases, batch_size, workers, "evaluate"):
        labels = postprocessing.apply(predict_labels(resized[None], threshold)[0])
        used.append(case_spacing(spacing_choice, by_stem[stem]))
        scorer.add(resized, mask, labels if decided else None, spacing=used[-1])
        stems.append(stem)
        sizes.append(size)
        pixels.append((int((mask > 0).sum()), int((labels > 0).sum())))
    per_case = scorer.per_case()
    summary = scorer.summary()

    name = (slug(data.resolve().name) + ("" if split in ("all", "test") else f"-{split}")
            + (f"-L{level}" if level else ""))
    if protocol_def.name != default_protocol:  # another protocol's numbers never overwrite the recipe's
        name += f"-{protocol_def.name}"
    name += plan_suffix(plan) + decision_suffix(threshold, threshold_source, tuned, postprocessing,
                                                recipe_postprocessing)
    final = check_output_folder(run.eval_dir(name), "output folder", MOVE_ASIDE)
    with user_write_errors(), atomic_folder(final, replace=True) as tmp:
        chosen = overlay_cases(stems, per_case.get(protocol_def.rank_metric), overlays)
        for stem in chosen:
            _write_overlay(tmp / "overlays" / f"{stem}.png", by_stem[stem], plan, threshold, postprocessing)
        info = report_record(
            protocol_def, summary, len(stems), split, data, spacing_record(spacing_choice, used),
            run=str(run.path.resolve()), model={**model_record(predictor.config), "level": level},
            numeric=predictor.mode.to_dict(), inference=plan.to_dict(),
            decision={"threshold": threshold, "threshold_source": threshold_source,
                      "postprocess": postprocessing.to_dict(),
                      "applies_to": "label metrics, overlays and predicted_pixels; map metrics use the probabilities"})
        write_report(tmp, info, stems, sizes, pixels, per_case, chosen, protocol_def.rank_metric)
    return final


def case_probabilities(plan: InferencePlan, data: Path, cases: list[Case], batch_size: int, workers: int | None,
                       task: str):
    """Check `data`'s `cases` (one line naming the first problem), then yield (stem, size, probabilities at the
    mask's size, mask) for each, with progress: what evaluate and tune-threshold score."""
    report = check_data(data, plan.num_classes, plan.reference.mask_threshold, stems={c.stem for c in cases})
    if report.errors:
        raise MedsegError(f"{data}: {report.errors[0].line()} — run `medseg check-data {data}` to see all problems")
    loader = DataLoader(inference_dataset(plan, cases), batch_size=batch_size if plan.resizes else 1,
                        collate_fn=collate_inference, num_workers=default_workers() if workers is None else workers)
    with Progress(task, len(cases)) as progress:
        for batch in loader:
            probs = plan.batch_at_original_size(batch["image"], batch["size"])
            yield from zip(batch["stem"], batch["size"], probs, batch["mask"])
            progress.update(len(batch["stem"]))


def plan_suffix(plan: InferencePlan) -> str:
    """The eval folder's suffix for a plan other than the model's default: tiling, TTA, ensemble size."""
    suffix = ""
    if plan.tiling != stored_tiling(plan.reference.config):
        suffix += "-resized" if plan.tiling is None else \
            f"-tile{plan.tiling.tile[0]}x{plan.tiling.tile[1]}-o{plan.tiling.overlap:g}"
    if plan.tta != "none":
        suffix += "-tta"
    if len(plan.predictors) > 1:
        suffix += f"-ensemble{len(plan.predictors)}"
    return suffix


def decision_suffix(threshold: float, threshold_source: str, tuned: float | None, postprocessing: PostProcessing,
                    recipe_postprocessing: PostProcessing) -> str:
    """The eval folder's suffix for a decision other than the model's: a one-off threshold, other post-processing."""
    suffix = f"-t{threshold:g}" if threshold_source == FROM_OPTION and threshold != (tuned or 0.5) else ""
    return suffix + ("-post" if postprocessing != recipe_postprocessing else "")


def _write_overlay(path: Path, case: Case, plan: InferencePlan, threshold: float = 0.5,
                   postprocessing: PostProcessing | None = None) -> None:
    """Prediction at `threshold` (argmax for multi-class), post-processed, over the image, annotation outlined."""
    original = load_image_tensor(case, plan.preprocessing, reduce=False)
    labels = predict_labels(plan.probabilities_at_original_size(original)[None], threshold)[0]
    labels = (postprocessing.apply(labels) if postprocessing else labels).numpy()
    truth = load_labels(case, plan.num_classes, plan.reference.mask_threshold).numpy()
    write_overlay(path, original.permute(1, 2, 0).numpy(), labels, truth)
