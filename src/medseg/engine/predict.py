"""`medseg predict`: masks for new images of any size, written at each input's own size.

By default each image is resized to the size the network was trained at (as evaluation does), so
predictions match the evaluated quality; `native=True` feeds the image at its own resolution instead, and
`tile` cuts it into overlapping tiles at its own resolution (the default for a network trained on crops);
`tta` and `ensemble` average flips and other runs (medseg.engine.inference.InferencePlan).
Either way the input is padded to the network's size multiple and the output cropped back. Outputs:
OUT/<stem>.png (0/255 binary, label values multi-class), <stem>_prob.png (foreground probability x 255;
one <stem>_prob_c<k>.png per class for three classes or more), <stem>_overlay.png, and with `--save-attention`
<stem>_attention_<gate>.png heat maps of a gated network's first-layer attention coefficients.

Every input is checked before anything is written (unreadable, empty, a volume, NaN pixels, a channel count the
network cannot take): the bad ones are named together in one line, or skipped with `skip_bad`. OUT/predict.json
records the inputs, the outputs, what was skipped and why, and the settings; it says `"complete": false` from
the first output on and `true` only once every output is written, so a killed predict is recognisable.
"""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from medseg.data.check import ERROR, Problem, check_images, group_problems
from medseg.data.dataset import collate_inference, load_image_tensor
from medseg.data.formats import Case
from medseg.data.io import IMAGE_EXTENSIONS, image_size, non_2d_format, write_image_atomic
from medseg.engine.inference import (
    InferencePlan,
    build_plan,
    heat_map,
    inference_dataset,
    label_image,
    overlay,
    resize_probabilities,
)
from medseg.engine.postprocess import PostProcessing, choose_threshold
from medseg.engine.run import now
from medseg.engine.train import default_workers
from medseg.errors import MedsegError
from medseg.files import check_output_folder, stale_removed_once, user_write_errors, write_text_atomic
from medseg.metrics import predict_labels
from medseg.progress import track

MANIFEST = "predict.json"
# How many bad inputs the one-line refusal names per problem (the rest are counted).
SHOWN = 3


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[Problem]]:
    """Files, folders (their images, not recursive) and glob patterns -> (image files in order, problems of the
    inputs that name no image: a missing path, an empty folder, a pattern matching nothing)."""
    found: list[Path] = []
    problems: list[Problem] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
            if not images:
                problems.append(Problem(ERROR, "no-images", item, _no_images(entries)))
            found += images
        elif path.is_file():
            found.append(path)
        elif path.is_symlink():
            problems.append(Problem(ERROR, "broken-link", item, "broken symbolic link: its target does not exist; "
                                    "fix the link", f"-> {path.readlink()}"))
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(item))
            images = [p for p in matches if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
            if not images:
                problems.append(Problem(ERROR, "no-images", item, f"pattern matches no images; {_no_images(matches)}"
                                        if matches else "pattern matches no files"))
            found += images
        else:
            problems.append(Problem(ERROR, "missing", item, "does not exist; give image files, folders or glob "
                                    "patterns"))
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems and stems[path.stem] != path:
            raise MedsegError(f"two inputs share the name {path.stem!r} ({stems[path.stem]} and {path}); "
                              "their outputs would overwrite each other — predict them into different --out folders")
        stems[path.stem] = path
    return list(dict.fromkeys(found)), problems


def _no_images(entries: list[Path]) -> str:
    """Why a folder or pattern gave no images: volumes are pointed at `medseg slices`."""
    volume = next((p for p in entries if non_2d_format(p)), None)
    if volume is not None:
        return f"no 2D images ({', '.join(IMAGE_EXTENSIONS)}), only files like {volume.name}, {non_2d_format(volume)}"
    return f"no images ({', '.join(IMAGE_EXTENSIONS)})"


def problems_line(problems: list[Problem], total: int) -> str:
    """'2 of 5 inputs cannot be predicted: a.png: reason; 3 files (b, c, d, ...): reason' (grouped as
    check-data groups its findings)."""
    bad = len({p.file for p in problems})
    groups = "; ".join(group.line(SHOWN) for group in group_problems(problems))
    return f"{bad} of {total} input(s) cannot be predicted: {groups}"


def check_threshold(threshold: float) -> None:
    """A decision threshold outside (0, 1) makes every mask empty (or full): refused, NaN included."""
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 < threshold < 1):
        raise MedsegError(f"--threshold must be a probability strictly between 0 and 1 (e.g. 0.5), got {threshold}; "
                          "outside that range every mask would be empty or full")


def output_names(stems: list[str], num_classes: int, overlay_images: bool, probabilities: bool) -> dict[str, str]:
    """Every file predict writes (attention maps aside) -> the stem it belongs to; two inputs whose outputs share
    a name ('a' with --overlay and an input 'a_overlay') are refused."""
    names: dict[str, str] = {MANIFEST: ""}
    for stem in stems:
        own = [f"{stem}.png"]
        if probabilities:
            own += ([f"{stem}_prob.png"] if num_classes <= 2
                    else [f"{stem}_prob_c{k}.png" for k in range(1, num_classes)])
        if overlay_images:
            own.append(f"{stem}_overlay.png")
        for name in own:
            if name in names:
                other = names[name] or "the manifest"
                raise MedsegError(f"inputs {other!r} and {stem!r} would both write {name}; rename one of them or "
                                  "predict them into different --out folders")
            names[name] = stem
    return names


def predict(model_path: str | Path, inputs: list[str], out: str | Path, overlay_images: bool = False,
            probabilities: bool = False, native: bool = False, threshold: float | None = None, batch_size: int = 8,
            device: str = "auto", level: int | None = None, save_attention: bool = False,
            precision: str = "auto", skip_bad: bool = False, *, ensemble: list[str | Path] = (),
            tile: str | None = None, overlap: float | None = None, tta: str = "none",
            postprocessing: PostProcessing | None = None) -> dict[str, Any]:
    """Predict every input image; returns the manifest written to OUT/predict.json (outputs, skipped inputs with
    their reasons, settings). `level` prunes a deeply supervised network (ANU-Net L_N); `save_attention` writes
    its first-layer attention coefficients as heat maps. Every input is checked first: bad ones are refused in
    one line naming them all, or with `skip_bad` left out and listed. `ensemble` adds runs whose probabilities are
    averaged with the first; `tile` ("256", "256x320", "off"), `overlap` and `tta` ("none", "flips") plan the
    inference (medseg.engine.inference). `threshold` None: the model folder's tuned threshold, else 0.5;
    `postprocessing` is applied to every label map."""
    if threshold is not None:
        check_threshold(threshold)
    postprocessing = postprocessing or PostProcessing()
    if batch_size < 1:
        raise MedsegError(f"--batch-size must be at least 1, got {batch_size}")
    out = check_output_folder(out, "--out")
    plan = build_plan([model_path, *ensemble], device, level, precision, tile, overlap, tta, native, batch_size)
    predictor = plan.reference
    # a tuned threshold belongs to one network: an ensemble's average, or an export without one, uses 0.5
    tuned = predictor.threshold if len(plan.predictors) == 1 else None
    threshold, threshold_source = choose_threshold(threshold, tuned, predictor.num_classes)
    if save_attention:
        plan.record_attention()
    paths, problems = expand_inputs(inputs)
    problems += check_images(paths, predictor.preprocessing.in_channels)
    bad = {p.file for p in problems}
    good = [p for p in paths if str(p) not in bad]
    total = len(paths) + len({p.file for p in problems if p.kind in ("missing", "no-images", "broken-link")})
    if problems and not skip_bad:
        raise MedsegError(f"{problems_line(problems, total)} — fix or remove them, or give --skip-bad to predict "
                          "the rest")
    if not good:
        raise MedsegError(problems_line(problems, total) if problems else
                          f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(inputs)}")
    names = output_names([p.stem for p in good], predictor.num_classes, overlay_images, probabilities)
    inputs_resolved = {p.resolve(): p for p in good}
    for name in names:
        if (out / name).resolve() in inputs_resolved:
            raise MedsegError(f"--out {out} would overwrite the input {inputs_resolved[(out / name).resolve()]} with "
                              f"{name}; give another --out folder")
    manifest = {
        "complete": False,
        "started": now(),
        "finished": None,
        "model": str(predictor.folder.resolve()),
        "settings": {"threshold": threshold, "threshold_source": threshold_source,
                     "postprocess": postprocessing.to_dict(), "native": native, "overlay": overlay_images,
                     "probabilities": probabilities, "level": level, "save_attention": save_attention,
                     "precision": precision, "device": str(predictor.device), "batch_size": batch_size,
                     "inference": plan.to_dict()},
        "inputs": [str(p) for p in good],
        "outputs": [],
        "skipped": [{"input": p.file, "reason": p.message + (f" [{p.detail}]" if p.detail else "")}
                    for p in problems],
    }
    with user_write_errors(), stale_removed_once(out):  # one search for stale temporaries, not one per file
        out.mkdir(parents=True, exist_ok=True)
        _write_manifest(out, manifest)  # "complete": false before the first output
        cases = [Case(p.stem, (p,), None) for p in good]
        written = manifest["outputs"]
        for case, probs, attention in track(_probabilities(plan, cases, batch_size), "predict", len(cases)):
            labels = postprocessing.apply(predict_labels(probs[None], threshold)[0])
            _write(out / f"{case.stem}.png", label_image(labels, predictor.num_classes), written)
            if probabilities:
                _write_probabilities(out, case.stem, probs, written)
            for name, coefficients in attention.items():
                resized = resize_probabilities(coefficients, tuple(probs.shape[-2:]))[0]
                _write(out / f"{case.stem}_attention_{name}.png", heat_map(resized), written)
            if overlay_images:
                image = load_image_tensor(case, predictor.preprocessing, reduce=False).permute(1, 2, 0).numpy()
                _write(out / f"{case.stem}_overlay.png", overlay(image, labels.numpy()), written)
        manifest.update(complete=True, finished=now())
        _write_manifest(out, manifest)
    return manifest


def _write(path: Path, picture: np.ndarray, written: list[str]) -> None:
    write_image_atomic(path, picture)
    written.append(path.name)


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _probabilities(plan: InferencePlan, cases: list[Case], batch_size: int):
    """Yield (case, probabilities (K, H, W) at the image's own size, {name: attention (1, h, w)}). DataLoader
    workers decode while the network runs. Tiled images go one a batch; `--native` batches images of the same
    size (from the file headers), in the order each size first appears, a batch holding no more pixels than a
    batch at the training size (large images still go one at a time)."""
    dataset = inference_dataset(plan, cases, with_masks=False)
    workers = min(default_workers(), max(0, len(cases) // batch_size))
    if plan.resizes:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_inference, num_workers=workers)
    elif plan.tiling is not None:
        loader = DataLoader(dataset, batch_size=1, collate_fn=collate_inference,
                            num_workers=min(default_workers(), len(cases)))
    else:
        loader = DataLoader(dataset, batch_sampler=same_size_batches(cases, batch_size, plan.preprocessing.size),
                            collate_fn=collate_inference, num_workers=workers)
    by_stem = {c.stem: c for c in cases}
    for batch in loader:
        probs = plan.batch_at_original_size(batch["image"], batch["size"])
        for index, (prob, stem) in enumerate(zip(probs, batch["stem"])):
            attention = {name: a[index] for name, a in plan.last_attention.items()}
            yield by_stem[stem], prob, attention


def same_size_batches(cases: list[Case], batch_size: int, training_size: tuple[int, int]) -> list[list[int]]:
    """Indices of `cases` grouped by image size (read from the headers), each group cut into batches of at most
    `batch_size` images and at most `batch_size` training-size images' worth of pixels."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, case in enumerate(cases):
        by_size.setdefault(image_size(case.images[0]), []).append(index)
    budget = batch_size * training_size[0] * training_size[1]
    batches = []
    for (height, width), group in by_size.items():
        step = max(1, min(batch_size, budget // (height * width)))
        batches += [group[i:i + step] for i in range(0, len(group), step)]
    return batches


def _write_probabilities(out: Path, stem: str, probs: torch.Tensor, written: list[str]) -> None:
    # rounded as the map protocols round (medseg.metrics.polyp): `medseg score` on these files equals evaluate
    scaled = (probs.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    if probs.shape[0] <= 2:  # binary: the foreground probability (the last channel of a two-class head)
        _write(out / f"{stem}_prob.png", np.ascontiguousarray(scaled[-1]), written)
        return
    for k in range(1, probs.shape[0]):
        _write(out / f"{stem}_prob_c{k}.png", np.ascontiguousarray(scaled[k]), written)
