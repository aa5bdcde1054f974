"""`medseg serve`: a small local web viewer (gradio) for one trained model.

Drop an image, see the probability map and the mask over the image, move a threshold slider, download the mask.
The network runs once per upload through the model's default inference plan (`medseg.engine.inference`: resized
to the training size, or tiles for a network trained on crops), the path `medseg predict` takes by default, so
the downloaded mask equals predict's `<stem>.png` for the same image and threshold; the slider only
re-thresholds the probabilities kept in the session (`gr.State`).

Choices (gradio is silent or defaults differ): the upload is a file, not gradio's image widget, so that medseg
reads it with its own reader (16-bit TIFF kept, volumes and NaN pixels refused as predict refuses them) instead
of a browser-decoded 8-bit copy; pictures go out as PNG (gradio's default WebP is lossy); analytics and the share
tunnel are off and the theme uses only bundled fonts, so nothing is fetched from the internet; masks for download
are written atomically into a temporary folder of this server, removed when it stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.check import check_images
from medseg.data.dataset import load_image_tensor
from medseg.data.formats import Case
from medseg.data.io import IMAGE_EXTENSIONS, write_image_atomic
from medseg.engine.inference import build_plan, heat_map, label_image, overlay
from medseg.engine.predict import check_threshold
from medseg.errors import MedsegError, user_message
from medseg.metrics import predict_labels

# The slider's range: a decision threshold strictly between 0 and 1, as predict requires.
SLIDER_STEP = 0.01


def import_gradio():
    """gradio with its telemetry off (it is read when gradio builds an app), or a one-line hint to install it."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise MedsegError("medseg serve needs gradio: pip install 'medseg[serve]'") from None
    return gradio


@dataclass
class Result:
    """One segmented upload, kept in the page's session: probabilities (K, H, W), the image as the network's
    channels (H, W, C) in [0, 1], its stem, and the folder its downloadable mask goes to."""

    probabilities: torch.Tensor
    image: np.ndarray
    stem: str
    folder: Path


class Viewer:
    """The model, the gradio page around it and the temporary folder of downloadable masks."""

    def __init__(self, model_path: str | Path, device: str = "auto", precision: str = "auto",
                 threshold: float | None = None):
        self.gr = import_gradio()
        self.plan = build_plan([model_path], device, precision=precision)
        self.predictor = self.plan.reference
        # a model folder's tuned threshold (`medseg tune-threshold`) when it has one, else predict's 0.5
        tuned = self.predictor.threshold
        self.threshold, self.threshold_source = ((threshold, "--threshold") if threshold is not None else
                                                 (tuned, "tuned on the validation split") if tuned is not None else
                                                 (0.5, "the default"))
        check_threshold(self.threshold)
        self.folder = Path(tempfile.mkdtemp(prefix="medseg-serve-"))
        self.blocks = self._build()
        self.url: str | None = None

    def description(self) -> str:
        """The model card shown at the top of the page."""
        config, prep = self.predictor.config, self.predictor.preprocessing
        height, width = prep.size
        tiling = self.plan.tiling
        how = (f"images are predicted in {tiling.tile[0]}x{tiling.tile[1]} tiles at their own resolution" if tiling
               else "images are resized to it and the probabilities back")
        rule = (f"foreground probability >= threshold, starting at {self.threshold:g} ({self.threshold_source})"
                if self.binary_threshold else "argmax over the classes (the slider does not apply)")
        return (f"**model** {config['name']} · **recipe** {config.get('recipe') or 'not recorded'} · "
                f"**training size** {height}x{width} ({how}) · "
                f"**classes** {self.predictor.num_classes} · **mask** {rule} · **device** {self.predictor.device}\n\n"
                f"model folder: `{self.predictor.folder.resolve()}`")

    @property
    def binary_threshold(self) -> bool:
        """A single sigmoid channel is thresholded; softmax heads take the argmax (as `predict_labels` does)."""
        return self.predictor.num_classes == 1

    def _build(self):
        gr = self.gr
        with gr.Blocks(title="medseg serve", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
            gr.Markdown("## medseg: segment an image")
            gr.Markdown(self.description())
            with gr.Row():
                upload = gr.File(label=f"image ({', '.join(IMAGE_EXTENSIONS)})", file_types=list(IMAGE_EXTENSIONS),
                                 type="filepath")
                slider = gr.Slider(SLIDER_STEP, 1 - SLIDER_STEP, value=self.threshold, step=SLIDER_STEP,
                                   label="threshold", interactive=self.binary_threshold)
            summary = gr.Markdown(label="summary")
            with gr.Row():
                # no "share" button: it posts to Hugging Face, and this viewer stays on this machine
                heat = gr.Image(label="probability map", format="png", type="numpy", interactive=False,
                                buttons=["download", "fullscreen"])
                tinted = gr.Image(label="mask over the image", format="png", type="numpy", interactive=False,
                                  buttons=["download", "fullscreen"])
            download = gr.File(label="mask (0/255 PNG)", interactive=False)
            state = gr.State()
            outputs = [heat, tinted, download, summary, state]
            upload.upload(self.segment, [upload, slider], outputs, api_name="segment")
            # .change, not .release: typing into the slider's number box changes it without a release; a drag's
            # many changes coalesce (gradio runs the last one once the pending one is done)
            slider.change(self.rethreshold, [slider, state], [tinted, download, summary, state], api_name="threshold")
            upload.clear(lambda: (None, None, None, "", None), None, outputs, api_visibility="private")
        return blocks

    def segment(self, path: str | None, threshold: float) -> tuple[Any, ...]:
        """Upload -> (heat map, overlay, mask file, summary, session result): the network runs here, once."""
        gr = self.gr
        if not path:
            raise gr.Error("no image received; drop a PNG, JPEG or TIFF image")
        path = Path(path)
        problems = check_images([path], self.predictor.preprocessing.in_channels, workers=1)
        if problems:  # the reason predict gives, naming the file by its uploaded name
            raise gr.Error(f"{path.name}: {problems[0].message}", print_exception=False)
        try:
            image = load_image_tensor(Case(path.stem, (path,), None), self.predictor.preprocessing, reduce=False)
            probabilities = self.plan.probabilities_at_original_size(image)
        except MedsegError as exc:
            raise gr.Error(user_message(exc), print_exception=False) from None
        result = Result(probabilities, image.permute(1, 2, 0).numpy(), path.stem,
                        Path(tempfile.mkdtemp(prefix="upload-", dir=self.folder)))
        shown = probabilities[-1] if probabilities.shape[0] <= 2 else 1 - probabilities[0]
        return (heat_map(shown), *self.rethreshold(threshold, result))

    def rethreshold(self, threshold: float, result: Result | None) -> tuple[Any, ...]:
        """Slider -> (overlay, mask file, summary, session result) from the kept probabilities; no network."""
        gr = self.gr
        if result is None:
            return gr.skip(), gr.skip(), gr.skip(), None
        try:
            check_threshold(threshold)
        except MedsegError as exc:
            raise gr.Error(user_message(exc), print_exception=False) from None
        labels = predict_labels(result.probabilities[None], threshold)[0]
        mask = result.folder / f"{result.stem}_mask.png"
        write_image_atomic(mask, label_image(labels, self.predictor.num_classes))
        height, width = labels.shape
        share = float((labels > 0).float().mean()) * 100
        rule = f"threshold {threshold:g}" if self.binary_threshold else "argmax"
        summary = f"**{result.stem}** {height}x{width} px · {rule} · foreground {share:.2f}% of the pixels"
        return overlay(result.image, labels.numpy()), str(mask), summary, result

    def launch(self, host: str = "127.0.0.1", port: int = 7860) -> str:
        """Start serving the page at http://HOST:PORT/ in the background; returns its address."""
        try:
            self.blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True, quiet=True,
                               show_error=True, ssr_mode=False, allowed_paths=[str(self.folder)])
        except OSError as exc:
            self.close()
            reason = " ".join(str(exc).split(".")[0].split())
            raise MedsegError(f"cannot serve on {host}:{port} ({reason}); give another --port, or stop what is "
                              "using it") from None
        self.url = self.blocks.local_url
        return self.url

    def wait(self) -> None:
        """Serve until Ctrl-C (or SIGTERM, as a service manager stops it), then stop and delete the temporary
        masks."""
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.blocks.block_thread()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the server (when running) and delete the temporary masks."""
        self.blocks.close(verbose=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # gradio's wait loop stops the server on it, as on Ctrl-C
