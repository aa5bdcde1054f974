"""`medseg predict`: masks for new images of any size, written at each input's own size.

By default each image is resized to the size the network was trained at (as evaluation does), so
predictions match the evaluated quality; `native=True` feeds the image at its own resolution instead.
Either way the input is padded to the network's size multiple and the output cropped back. Outputs:
OUT/<stem>.png (0/255 binary, label values multi-class), <stem>_prob.png (foreground probability x 255;
one <stem>_prob_c<k>.png per class for three classes or more), <stem>_overlay.png, and with `--save-attention`
<stem>_attention_<gate>.png heat maps of a gated network's first-layer attention coefficients.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from medseg.data.dataset import InferenceDataset, collate_inference, load_image_tensor
from medseg.data.formats import Case
from medseg.data.io import IMAGE_EXTENSIONS, write_image_atomic
from medseg.engine.inference import Predictor, heat_map, label_image, overlay, resize_probabilities
from medseg.engine.train import default_workers
from medseg.errors import MedsegError
from medseg.metrics import predict_labels


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files, folders (their images, not recursive) and glob patterns -> image files, in order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir()
                            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
        elif any(ch in item for ch in "*?["):
            found += sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise MedsegError(f"input {item} does not exist; give image files, folders or glob patterns")
    if not found:
        raise MedsegError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(inputs)}")
    stems: dict[str, Path] = {}
    for path in found:
        if path.stem in stems and stems[path.stem] != path:
            raise MedsegError(f"two inputs share the name {path.stem!r} ({stems[path.stem]} and {path}); "
                              "their outputs would overwrite each other — predict them into different --out folders")
        stems[path.stem] = path
    return list(dict.fromkeys(found))


def predict(model_path: str | Path, inputs: list[str], out: str | Path, overlay_images: bool = False,
            probabilities: bool = False, native: bool = False, threshold: float = 0.5, batch_size: int = 8,
            device: str = "auto", level: int | None = None, save_attention: bool = False,
            precision: str = "auto") -> list[Path]:
    """Predict every input image; returns the mask files written. `level` prunes a deeply supervised
    network (ANU-Net L_N); `save_attention` writes its first-layer attention coefficients as heat maps."""
    predictor = Predictor(model_path, device, level, precision)
    if save_attention:
        predictor.record_attention()
    out = Path(out)
    cases = [Case(p.stem, (p,), None) for p in expand_inputs(inputs)]
    written = []
    for case, probs, attention in _probabilities(predictor, cases, native, batch_size):
        labels = predict_labels(probs[None], threshold)[0]
        target = out / f"{case.stem}.png"
        write_image_atomic(target, label_image(labels, predictor.num_classes))
        written.append(target)
        if probabilities:
            _write_probabilities(out, case.stem, probs)
        for name, coefficients in attention.items():
            resized = resize_probabilities(coefficients, tuple(probs.shape[-2:]))[0]
            write_image_atomic(out / f"{case.stem}_attention_{name}.png", heat_map(resized))
        if overlay_images:
            image = load_image_tensor(case, predictor.preprocessing, reduce=False).permute(1, 2, 0).numpy()
            write_image_atomic(out / f"{case.stem}_overlay.png", overlay(image, labels.numpy()))
    return written


def _probabilities(predictor: Predictor, cases: list[Case], native: bool, batch_size: int):
    """Yield (case, probabilities (K, H, W) at the image's own size, {name: attention (1, h, w)})."""
    prep = predictor.preprocessing
    if native:
        for case in cases:
            image = load_image_tensor(case, prep, reduce=False)
            probs = predictor.probabilities(prep.normalise(image)[None]).cpu()[0]
            yield case, probs, {name: a[0] for name, a in predictor.last_attention.items()}
        return
    dataset = InferenceDataset(cases, prep, with_masks=False)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_inference,
                        num_workers=min(default_workers(), max(0, len(cases) // batch_size)))
    by_stem = {c.stem: c for c in cases}
    for batch in loader:
        probs = predictor.probabilities(batch["image"]).cpu()
        for index, (prob, stem, size) in enumerate(zip(probs, batch["stem"], batch["size"])):
            attention = {name: a[index] for name, a in predictor.last_attention.items()}
            yield by_stem[stem], resize_probabilities(prob, size), attention


def _write_probabilities(out: Path, stem: str, probs: torch.Tensor) -> None:
    scaled = (probs.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy()
    if probs.shape[0] <= 2:  # binary: the foreground probability (the last channel of a two-class head)
        write_image_atomic(out / f"{stem}_prob.png", np.ascontiguousarray(scaled[-1]))
        return
    for k in range(1, probs.shape[0]):
        write_image_atomic(out / f"{stem}_prob_c{k}.png", np.ascontiguousarray(scaled[k]))
