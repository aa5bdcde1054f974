"""`medseg serve`: the web viewer started in this process on a free local port and driven with gradio's own client,
as a browser would drive it: its mask is the one `medseg predict` writes, the slider re-thresholds it, bad uploads
get one line, and a machine without gradio is told which extra to install."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from gradio_client import Client, handle_file  # the test extra installs gradio: a missing one fails, not skips
from gradio_client.exceptions import AppError
from PIL import Image

from conftest import medseg_inprocess, refused


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init U-Net saved as a model folder trained at 64 px (its probabilities sit around 0.5, so a small
    move of the threshold changes the mask)."""
    from medseg.models import create_model, save_model

    torch.manual_seed(0)
    return save_model(create_model("unet", 3, 1, base_channels=4), tmp_path_factory.mktemp("serve") / "model",
                      extra={"preprocessing": {"size": [64, 64], "in_channels": 3, "normalize": "imagenet"},
                             "recipe": "unet"})


@pytest.fixture(scope="module")
def nuclei_image(shared_data: Path) -> Path:
    """A real DSB2018 image (RGB PNG, 256 px or more; not the training size)."""
    return sorted((shared_data / "dsb2018_nuclei" / "images").glob("*.png"))[0]


@pytest.fixture(scope="module")
def viewer(model: Path):
    from medseg.engine.serve import Viewer

    viewer = Viewer(model, device="cpu")
    viewer.launch("127.0.0.1", free_port())
    yield viewer
    viewer.close()


def predicted_mask(model: Path, image: Path, threshold: float, out: Path) -> np.ndarray:
    """The mask `medseg predict` writes for one image."""
    result = medseg_inprocess("predict", str(model), str(image), "--out", str(out), "--threshold", str(threshold),
                              "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return np.array(Image.open(out / f"{image.stem}.png"))


def test_the_page_shows_the_model_and_its_mask_is_the_one_predict_writes(viewer, model, nuclei_image, tmp_path):
    from medseg.engine.inference import build_plan

    assert "**model** unet" in viewer.description() and "**recipe** unet" in viewer.description()
    assert "64x64" in viewer.description() and "starting at 0.5 (the default)" in viewer.description()
    # two of the probability values this image gets (exact floats: a mask is `probability >= threshold`), a third
    # of the distinct values apart, so that the slider's move changes the mask
    from medseg.data.dataset import load_image_tensor
    from medseg.data.formats import Case

    plan = build_plan([model], "cpu")
    image = load_image_tensor(Case(nuclei_image.stem, (nuclei_image,), None), plan.preprocessing, reduce=False)
    values = torch.unique(plan.probabilities_at_original_size(image))
    assert len(values) >= 3
    low, high = float(values[len(values) // 3]), float(values[2 * len(values) // 3])
    client = Client(viewer.url, verbose=False, download_files=str(tmp_path / "client"))
    heat, tinted, mask_file, summary = client.predict(handle_file(str(nuclei_image)), low, api_name="/segment")
    served = np.array(Image.open(mask_file))
    width, height = Image.open(nuclei_image).size
    assert served.shape == (height, width) and set(np.unique(served)) <= {0, 255}
    assert Path(mask_file).name == f"{nuclei_image.stem}_mask.png"
    np.testing.assert_array_equal(served, predicted_mask(model, nuclei_image, low, tmp_path / "low"))
    assert np.array(Image.open(heat)).shape == (height, width, 3)
    assert np.array(Image.open(tinted)).shape == (height, width, 3)
    assert f"{height}x{width} px" in summary and f"threshold {low:g}" in summary

    tinted_high, mask_high, summary_high = client.predict(high, api_name="/threshold")
    moved = np.array(Image.open(mask_high))
    np.testing.assert_array_equal(moved, predicted_mask(model, nuclei_image, high, tmp_path / "high"))
    assert (moved > 0).sum() < (served > 0).sum() and f"threshold {high:g}" in summary_high
    assert not np.array_equal(np.array(Image.open(tinted_high)), np.array(Image.open(tinted)))


def test_a_three_class_model_shows_its_argmax_labels(nuclei_image, tmp_path):
    """No threshold for a softmax head: the mask holds the argmax labels predict writes, the heat map the
    probability of any foreground."""
    from medseg.engine.serve import Viewer
    from medseg.models import create_model, save_model

    torch.manual_seed(0)
    network = create_model("unet", 3, 3, base_channels=4)
    with torch.no_grad():
        network.head.bias[2] += 0.05  # random init gives every pixel class 0; this splits the image between 0 and 2
    model = save_model(network, tmp_path / "three",
                       extra={"preprocessing": {"size": [64, 64], "in_channels": 3, "normalize": "imagenet"}})
    viewer = Viewer(model, device="cpu", threshold=0.3)
    try:
        assert "argmax" in viewer.description() and "not recorded" in viewer.description()
        heat, tinted, mask_file, summary, result = viewer.segment(str(nuclei_image), 0.3)
        labels = np.array(Image.open(mask_file))
        assert heat.shape == tinted.shape == (*labels.shape, 3) and "argmax" in summary
        assert set(np.unique(labels)) <= {0, 1, 2} and len(np.unique(labels)) > 1
        np.testing.assert_array_equal(labels, predicted_mask(model, nuclei_image, 0.5, tmp_path / "predict"))
    finally:
        viewer.close()
    assert not viewer.folder.exists()


def test_bad_uploads_get_one_line_in_the_page(viewer, tmp_path):
    client = Client(viewer.url, verbose=False, download_files=str(tmp_path / "client"))
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((12, 32, 32), np.uint8))
    with pytest.raises(AppError, match=r"^stack\.tif: .*not one 2D image"):
        client.predict(handle_file(str(stack)), 0.5, api_name="/segment")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a picture")
    with pytest.raises(AppError, match=r"^broken\.png: cannot read image"):
        client.predict(handle_file(str(broken)), 0.5, api_name="/segment")


def test_a_busy_port_is_refused_in_one_line(viewer, model):
    from medseg.engine.serve import Viewer
    from medseg.errors import MedsegError

    port = int(viewer.url.rstrip("/").rsplit(":", 1)[1])
    second = Viewer(model, device="cpu")
    with pytest.raises(MedsegError, match=f"cannot serve on 127.0.0.1:{port} .*another --port"):
        second.launch("127.0.0.1", port)
    assert not second.folder.exists()


def test_without_gradio_the_command_names_the_extra(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what `import gradio` meets on a machine without it
    refused(medseg_inprocess("serve", str(model), "--device", "cpu"), "medseg serve needs gradio",
            "pip install 'medseg[serve]'")


def test_the_help_names_the_options_and_an_example():
    from typer.testing import CliRunner

    from medseg.cli import app

    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert help_text.exit_code == 0 and "Example: medseg serve" in help_text.stdout
    assert all(option in help_text.stdout for option in ("--host", "--port", "--device", "--threshold"))
    assert "--share" not in help_text.stdout  # offline: no public tunnel
