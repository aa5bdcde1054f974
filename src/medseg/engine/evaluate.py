"""`medseg evaluate`: score a run on a data folder under a named metric protocol.

Writes RUN/eval/<data>[-<split>]/ atomically: per_case.csv (one row per image), summary.json (the
protocol with its full definition, the numbers, what was scored), report.md (the table, best and worst
cases) and overlays/ (prediction tinted red, annotation outlined green), through `medseg.engine.score`, which
writes the same report for a folder of predictions. Probabilities are resized back to each mask's original size
before thresholding, so scores are at annotation resolution.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from medseg.data.check import check_data
from medseg.data.dataset import InferenceDataset, collate_inference, load_image_tensor, load_labels
from medseg.data.formats import Case, discover
from medseg.data.splits import cases_for
from medseg.engine.inference import Predictor, resize_probabilities
from medseg.engine.postprocess import FROM_OPTION, TUNED, PostProcessing, choose_threshold
from medseg.engine.predict import check_threshold
from medseg.engine.run import Run, now, slug
from medseg.engine.score import case_spacing, overlay_cases, parse_spacing, spacing_record, write_overlay, write_report
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
             level: int | None = None, precision: str = "auto", spacing: str | None = None,
             threshold: float | None = None, postprocessing: PostProcessing | None = None) -> Path:
    """Score the run's saved model on `data` (default: the folder it was trained on; pruned to `level` if given);
    returns the eval folder. `spacing`: the pixel spacing of the surface metrics (`score.parse_spacing`). The
    label metrics use `threshold` (None: the model folder's tuned one, else the protocol's) and `postprocessing`
    (None: the recipe's eval.postprocess); map metrics use the probabilities."""
    run = Run(run_path).require()
    data = Path(data) if data is not None else run.data_root()
    if not data.is_dir():
        raise MedsegError(f"data folder {data} does not exist" + ("" if data != run.data_root() else
                          " (the run was trained on it; give --data where it is now)"))
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
    predictor = Predictor(run.path, device, level, precision)
    threshold, threshold_source = choose_threshold(threshold, predictor.threshold, predictor.num_classes)
    if postprocessing is None:
        postprocessing = PostProcessing(**run.recipe().eval.postprocess.model_dump())
    # the decided labels replace the protocol's own thresholding only when the decision differs from it
    decided = postprocessing.active or threshold_source in (FROM_OPTION, TUNED)
    default_protocol = run.recipe().eval.protocol
    protocol_def = get_protocol(protocol or default_protocol)
    cases, split = select_cases(run, data, split)
    report = check_data(data, predictor.num_classes, predictor.mask_threshold, stems={c.stem for c in cases})
    if report.errors:
        first = report.errors[0]
        raise MedsegError(f"{data}: {first.line()} — run `medseg check-data {data}` to see all problems")

    dataset = InferenceDataset(cases, predictor.preprocessing, predictor.num_classes, predictor.mask_threshold)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_inference,
                        num_workers=default_workers() if workers is None else workers)
    scorer = protocol_def.scorer(predictor.num_classes)
    stems, sizes, pixels, used = [], [], [], []
    by_stem = {c.stem: c for c in cases}
    with Progress("evaluate", len(cases)) as progress:
        for batch in loader:
            probs = predictor.probabilities(batch["image"]).cpu()
            for prob, mask, stem, size in zip(probs, batch["mask"], batch["stem"], batch["size"]):
                resized = resize_probabilities(prob, size)
                labels = postprocessing.apply(predict_labels(resized[None], threshold)[0])
                used.append(case_spacing(spacing_choice, by_stem[stem]))
                scorer.add(resized, mask, labels if decided else None, spacing=used[-1])
                stems.append(stem)
                sizes.append(size)
                pixels.append((int((mask > 0).sum()), int((labels > 0).sum())))
            progress.update(len(batch["stem"]))
    per_case = scorer.per_case()
    summary = scorer.summary()

    name = (slug(data.resolve().name) + ("" if split in ("all", "test") else f"-{split}")
            + (f"-L{level}" if level else ""))
    if protocol_def.name != default_protocol:  # another protocol's numbers never overwrite the recipe's
        name += f"-{protocol_def.name}"
    final = check_output_folder(run.eval_dir(name), "output folder", MOVE_ASIDE)
    with user_write_errors(), atomic_folder(final, replace=True) as tmp:
        chosen = overlay_cases(stems, per_case.get(protocol_def.rank_metric), overlays)
        for stem in chosen:
            _write_overlay(tmp / "overlays" / f"{stem}.png", by_stem[stem], predictor, threshold, postprocessing)
        info = {
            "protocol": protocol_def.definition(),
            "metrics": summary,
            "cases": len(stems),
            "split": split,
            "data": str(data.resolve()),
            "run": str(run.path.resolve()),
            "model": {**{k: predictor.config[k] for k in ("name", "in_channels", "num_classes", "checkpoint", "recipe")
                          if k in predictor.config}, "level": level},
            "numeric": predictor.mode.to_dict(),
            "spacing": spacing_record(spacing_choice, used),
            "decision": {"threshold": threshold, "threshold_source": threshold_source,
                         "postprocess": postprocessing.to_dict(),
                         "applies_to": "label metrics, overlays and predicted_pixels; map metrics use the "
                                       "probabilities"},
            "synthetic": (data / "README.md").is_file() and "SYNTHETIC" in (data / "README.md").read_text(),
            "created": now(),
        }
        write_report(tmp, info, stems, sizes, pixels, per_case, chosen, protocol_def.rank_metric)
    return final


def _write_overlay(path: Path, case: Case, predictor: Predictor, threshold: float = 0.5,
                   postprocessing: PostProcessing | None = None) -> None:
    """Prediction at `threshold` (argmax for multi-class), post-processed, over the image, annotation outlined."""
    original = load_image_tensor(case, predictor.preprocessing, reduce=False)
    prep = predictor.preprocessing
    probs = predictor.probabilities(prep.normalise(prep.resize(original))[None]).cpu()[0]
    labels = predict_labels(resize_probabilities(probs, tuple(original.shape[-2:]))[None], threshold)[0]
    labels = (postprocessing.apply(labels) if postprocessing else labels).numpy()
    truth = load_labels(case, predictor.num_classes, predictor.mask_threshold).numpy()
    write_overlay(path, original.permute(1, 2, 0).numpy(), labels, truth)
