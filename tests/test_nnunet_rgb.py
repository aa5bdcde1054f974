"""nnU-Net raw 2D RGB datasets: one `<case>_0000.png` RGB file per case with channel_names R, G, B (nnU-Net v2's
natural-image convention) is read as a 3-channel case, checked, trained on and evaluated; mismatches get one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import TINY, medseg_inprocess
from medseg.data.check import check_data
from medseg.data.formats import discover, load_case

RGB_META = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "polyp": 1},
            "numTraining": 8, "file_ending": ".png"}


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _case(root: Path, images: str, labels: str, name: str, seed: int) -> None:
    """A 64 px RGB image with a reddish disc on a noisy background, and the disc as a 0/1 label."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:64, :64]
    centre = rng.integers(20, 44, size=2)
    disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < rng.integers(8, 14) ** 2
    image = rng.integers(0, 80, size=(64, 64, 3), dtype=np.uint8)
    image[disc] = (220, 90, 60)
    _save(root / images / f"{name}_0000.png", image)
    _save(root / labels / f"{name}.png", disc.astype(np.uint8))


def _rgb_dataset(root: Path, n_train: int = 8, n_test: int = 2) -> Path:
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(RGB_META))
    for index in range(n_train):
        _case(root, "imagesTr", "labelsTr", f"polyp_{index:03d}", index)
    for index in range(n_test):
        _case(root, "imagesTs", "labelsTs", f"held_{index:03d}", 100 + index)
    return root


def test_discover_reads_one_rgb_file_per_case_as_three_channels(tmp_path):
    root = _rgb_dataset(tmp_path / "Dataset120_Polyps", n_train=3, n_test=1)
    layout = discover(root)
    assert [c.stem for c in layout.cases] == ["polyp_000", "polyp_001", "polyp_002"]
    assert [c.stem for c in layout.test_cases] == ["held_000"]
    assert layout.unpaired_images == [] and layout.unpaired_masks == []
    assert layout.cases[0].images == (root / "imagesTr" / "polyp_000_0000.png",)
    assert layout.cases[0].channels == 3
    image = load_case(layout.cases[0])
    assert image.shape == (64, 64, 3)
    stored = np.asarray(Image.open(root / "imagesTr" / "polyp_000_0000.png"))
    np.testing.assert_allclose(image, stored / 255, atol=1e-6)  # R, G, B in order, not luma


def test_check_data_reports_three_channels(tmp_path):
    root = _rgb_dataset(tmp_path / "Dataset120_Polyps", n_train=3, n_test=1)
    report = check_data(root)
    assert report.kind == "nnunet" and report.n_cases == 4
    assert report.ok and report.errors == []
    assert report.stats["channels"] == {3: 4}
    result = medseg_inprocess("check-data", str(root))
    assert result.returncode == 0, result.stderr


def test_three_separate_channel_files_still_stack(tmp_path):
    root = _rgb_dataset(tmp_path / "Dataset121_Split", n_train=1, n_test=0)
    rgb = np.asarray(Image.open(root / "imagesTr" / "polyp_000_0000.png"))
    for channel in range(3):
        _save(root / "imagesTr" / f"polyp_000_{channel:04d}.png", np.ascontiguousarray(rgb[..., channel]))
    (case,) = discover(root).cases
    assert len(case.images) == 3 and case.channels is None
    np.testing.assert_allclose(load_case(case), rgb / 255, atol=1e-6)


def test_a_gray_rgb_case_gets_one_clear_line(tmp_path):
    root = _rgb_dataset(tmp_path / "Dataset122_Gray", n_train=3, n_test=0)
    _save(root / "imagesTr" / "polyp_001_0000.png", np.full((64, 64), 90, np.uint8))
    report = check_data(root)
    (problem,) = report.errors
    assert report.warnings == []  # not also "medseg converts gray <-> RGB": this case is refused
    assert problem.kind == "channel-count" and problem.file == "imagesTr/polyp_001_0000.png"
    assert "decodes to 1 channel(s) but dataset.json lists 3" in problem.message
    result = medseg_inprocess("check-data", str(root))
    assert result.returncode == 1 and "imagesTr/polyp_001_0000.png" in result.stdout
    refused = medseg_inprocess("train", "--recipe", "unet", "--data", str(root), "--out", str(tmp_path / "runs"),
                               *[arg for setting in TINY for arg in ("--set", setting)])
    assert refused.returncode == 2
    line = refused.error_line()
    assert "polyp_001_0000.png" in line and "lists 3" in line


def test_an_rgb_case_with_a_second_channel_file_is_incomplete(tmp_path):
    root = _rgb_dataset(tmp_path / "Dataset123_Mixed", n_train=2, n_test=0)
    _save(root / "imagesTr" / "polyp_001_0001.png", np.full((64, 64), 90, np.uint8))
    layout = discover(root)
    assert [c.stem for c in layout.cases] == ["polyp_000"]
    first = root / "imagesTr" / "polyp_001_0000.png"
    assert layout.unpaired_images == [first, root / "imagesTr" / "polyp_001_0001.png"]
    assert layout.details[first] == "no polyp_001_0002.png"
    assert "or keep one RGB <case>_0000.png alone" in layout.notes[first]
    assert {p.kind for p in check_data(root).errors} == {"unpaired-image", "unpaired-mask"}


def test_the_rgb_dataset_trains_and_evaluates(tmp_path):
    root = _rgb_dataset(tmp_path / "Dataset120_Polyps")
    settings = [*TINY[:-1], "model.base_channels=8", "train.epochs=1"]
    result = medseg_inprocess("train", "--recipe", "unet", "--data", str(root), "--out", str(tmp_path / "runs"),
                              *[arg for setting in settings for arg in ("--set", setting)])
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [path for path in (tmp_path / "runs").iterdir() if path.is_dir()]
    splits = json.loads((run / "splits.json").read_text())
    assert sorted(splits["test"]) == ["held_000", "held_001"]
    evaluated = medseg_inprocess("evaluate", str(run), "--overlays", "1")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (summary_file,) = (run / "eval").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["cases"] == 2 and 0.0 <= summary["metrics"]["dice"]["value"] <= 1.0
