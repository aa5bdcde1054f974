"""Progress of predict, evaluate and check-data (periodic lines where stderr is not a terminal), predict's
native-size batching, and the one-listing clean-up of stale temporaries."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import run_cli
from medseg.files import atomic_file, remove_stale_temporaries_in, stale_removed_once
from medseg.progress import Progress, track

LINE = re.compile(r"predict: (\d+)/(\d+) images, [\d.]+ img/s, (eta \d+ s|\d+ s)")


def test_lines_every_tenth_and_at_the_end_when_not_a_terminal():
    stream = io.StringIO()
    with Progress("predict", 20, stream=stream) as progress:
        for _ in range(20):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert [LINE.fullmatch(line).group(1) for line in lines] == [str(n) for n in range(2, 21, 2)]
    assert lines[0].endswith(" s") and "eta" in lines[0] and "eta" not in lines[-1]


def test_a_line_every_interval_even_within_a_tenth():
    stream = io.StringIO()
    with Progress("evaluate", 1000, unit="cases", stream=stream, interval_s=0) as progress:
        for _ in range(5):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and lines[0].startswith("evaluate: 1/1000 cases,") and "case/s" in lines[0]
    assert lines[4].startswith("evaluate: 5/1000") and "eta" not in lines[5]  # 5 periodic lines, then the last


def test_a_terminal_gets_a_bar_and_no_lines():
    stream = io.StringIO()
    with Progress("predict", 10, stream=stream, bar=True) as progress:
        for _ in range(10):
            progress.update()
    assert "predict" in stream.getvalue() and "\r" in stream.getvalue()
    assert not LINE.search(stream.getvalue())


def test_an_interrupted_loop_writes_no_final_line():
    stream = io.StringIO()
    try:
        with Progress("predict", 4, stream=stream, interval_s=1e9) as progress:
            progress.update()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    lines = stream.getvalue().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("predict: 1/4 images") and "eta" in lines[0]


def test_track_yields_every_item_and_reports_on_stderr(capsys):
    assert list(track(iter("abcde"), "check-data", 5, "cases")) == list("abcde")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("check-data: 5/5 cases,") and len(lines) == 5


def test_predict_and_check_data_print_progress_lines_in_a_log(tiny_run, phantom, tmp_path):
    result = run_cli("predict", str(tiny_run.path), str(phantom / "images"), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-2000:]
    total = len(list((phantom / "images").iterdir()))
    lines = [m.groups() for m in map(LINE.fullmatch, result.stderr.splitlines()) if m]
    assert len(lines) >= 2 and lines[-1][:2] == (str(total), str(total)) and lines[0][2].startswith("eta")
    checked = run_cli("check-data", str(phantom))
    assert checked.returncode == 0 and f"check-data: {total}/{total} cases" in checked.stderr


def test_native_predict_batches_images_of_one_size_with_the_same_result(tiny_run, phantom, tmp_path, monkeypatch):
    from medseg.engine import predict as predict_module
    from medseg.engine.inference import Predictor

    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = sorted((phantom / "images").iterdir())[:5]
    for index, source in enumerate(sources):
        image = Image.open(source)
        (image if index % 2 else image.resize((80, 48))).save(folder / f"{source.stem}.png")
    shapes = []
    original = Predictor.probabilities

    def recording(self, images):
        shapes.append(tuple(images.shape))
        return original(self, images)

    monkeypatch.setattr(Predictor, "probabilities", recording)
    manifest = predict_module.predict(tiny_run.path, [str(folder)], tmp_path / "batched", probabilities=True,
                                      native=True, batch_size=2, device="cpu")
    assert sorted((s[0], s[2:]) for s in shapes) == [(1, (48, 80)), (2, (48, 80)), (2, (64, 64))]
    assert manifest["complete"] and len(manifest["inputs"]) == 5
    shapes.clear()
    predict_module.predict(tiny_run.path, [str(folder)], tmp_path / "single", probabilities=True, native=True,
                           batch_size=1, device="cpu")
    assert len(shapes) == 5
    for source in sources:
        batched = np.asarray(Image.open(tmp_path / "batched" / f"{source.stem}_prob.png"), dtype=int)
        single = np.asarray(Image.open(tmp_path / "single" / f"{source.stem}_prob.png"), dtype=int)
        size = Image.open(folder / f"{source.stem}.png").size
        assert batched.shape == (size[1], size[0]) and np.abs(batched - single).max() <= 1


def test_stale_temporaries_of_a_folder_go_in_one_listing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".a.png.{dead_pid}-0123456789ab.tmp"
    live = tmp_path / f".b.png.{os.getpid()}-0123456789ab.tmp"
    ordinary = tmp_path / "c.png"
    for path in (stale, live, ordinary):
        path.write_bytes(b"x")
    assert remove_stale_temporaries_in(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and ordinary.exists()
    assert remove_stale_temporaries_in(tmp_path / "none") == []
    stale.write_bytes(b"x")
    with stale_removed_once(tmp_path):
        assert not stale.exists()
        stale.write_bytes(b"x")  # appears after the sweep: writers inside the block do not look again
        with atomic_file(tmp_path / "a.png") as temporary:
            temporary.write_bytes(b"png")
        assert stale.exists()
    with atomic_file(tmp_path / "a.png") as temporary:  # outside the block: the per-file search again
        temporary.write_bytes(b"png")
    assert not stale.exists() and (tmp_path / "a.png").read_bytes() == b"png"
