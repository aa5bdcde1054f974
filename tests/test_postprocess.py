"""Post-processing on hand-made label maps: each step, their order, 8-connectivity, multi-class conflicts, and
its use in evaluate (labels passed to the scorer) and in the recipe."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml

from conftest import medseg_inprocess
from medseg.config import load_recipe
from medseg.engine.postprocess import PostProcessing, from_flags
from medseg.errors import MedsegError
from medseg.metrics import get_protocol


def grid(rows: list[str]) -> torch.Tensor:
    """'.' background, digits labels."""
    return torch.tensor([[0 if c == "." else int(c) for c in row] for row in rows], dtype=torch.long)


def test_inactive_post_processing_returns_the_labels_untouched():
    labels = grid(["1.1", ".1.", "..1"])
    steps = PostProcessing()
    assert not steps.active
    assert steps.apply(labels) is labels
    assert PostProcessing(min_size=1).active and PostProcessing(fill_holes=True).active


def test_largest_component_keeps_the_biggest_blob_and_counts_diagonal_neighbours_as_connected():
    labels = grid(["11....",
                   "11....",
                   "..1...",   # diagonal to the 2x2 block: 8-connected, so part of it (5 pixels)
                   ".....1",
                   "....11",
                   "....11"])  # 5 pixels too, but later in raster order
    out = PostProcessing(largest_component=True).apply(labels)
    assert out.dtype == labels.dtype
    assert out.tolist() == grid(["11....", "11....", "..1...", "......", "......", "......"]).tolist()


def test_min_size_drops_small_components_only():
    labels = grid(["1..111",
                   "...111",
                   "11....",
                   "1....."])
    out = PostProcessing(min_size=3).apply(labels)
    assert out.tolist() == grid(["...111", "...111", "11....", "1....."]).tolist()  # the single pixel goes
    assert PostProcessing(min_size=7).apply(labels).sum() == 0
    assert PostProcessing(min_size=4, largest_component=True).apply(labels).tolist() == \
        grid(["...111", "...111", "......", "......"]).tolist()


def test_fill_holes_fills_enclosed_background_but_not_an_open_bay():
    labels = grid(["11111.....",
                   "1...1.111.",
                   "1...1.1.1.",
                   "11111.1...",   # the second shape is open at the bottom right: a bay, not a hole
                   "......111."])
    out = PostProcessing(fill_holes=True).apply(labels)
    assert out[1:3, 1:4].eq(1).all()
    assert out[2, 7] == 0 and out[3, 7] == 0


def test_a_diagonal_gap_in_an_outline_does_not_let_the_hole_leak():
    labels = grid([".111.",
                   "1...1",
                   "1...1",
                   ".111."])  # corners missing: 8-connected ring, the hole is 4-connected background
    out = PostProcessing(fill_holes=True).apply(labels)
    assert out[1:3, 1:4].eq(1).all() and out[0, 0] == 0


def test_holes_are_filled_before_the_size_rule():
    ring = grid(["111.", "1.1.", "111.", "...."])  # 8 pixels, 9 once its hole is filled
    assert PostProcessing(min_size=9).apply(ring).sum() == 0
    filled = PostProcessing(min_size=9, fill_holes=True).apply(ring)
    assert filled.tolist() == grid(["111.", "111.", "111.", "...."]).tolist()


def test_multi_class_keeps_other_classes_in_holes_and_gives_contested_pixels_to_the_innermost_object():
    labels = grid(["1111111",
                   "1.....1",
                   "1.222.1",
                   "1.2.2.1",
                   "1.222.1",
                   "1.....1",
                   "1111111"])
    out = PostProcessing(fill_holes=True).apply(labels)
    assert out[3, 3] == 2  # inside both rings: the inner one (smaller filled object) wins
    assert out[1, 1] == 1 and out[5, 5] == 1  # between the rings: class 1's hole
    assert out[2, 2] == 2 and out[4, 4] == 2  # the class-2 ring itself is kept
    inner = grid(["1111.", "1221.", "1111.", "....3"])
    kept = PostProcessing(largest_component=True, min_size=1).apply(inner)
    assert kept.tolist() == inner.tolist()  # one component per class: all kept


def test_invalid_min_size_is_one_line():
    with pytest.raises(MedsegError, match="--min-size"):
        PostProcessing(min_size=-1)


def test_to_dict_records_every_setting():
    record = PostProcessing(largest_component=True, min_size=5).to_dict()
    assert record["largest_component"] and record["min_size"] == 5 and not record["fill_holes"]
    assert record["connectivity"] == 8 and "fill holes" in record["order"]


def test_confusion_scorer_scores_the_given_labels_instead_of_thresholding():
    probs = torch.full((1, 4, 4), 0.9)
    mask = torch.zeros(4, 4, dtype=torch.long)
    mask[:2] = 1
    scorer = get_protocol("paper").scorer(1)
    scorer.add(probs, mask)
    scorer.add(probs, mask, labels=mask.clone())
    dice = scorer.per_case()["dice"]
    assert dice[0] == pytest.approx(2 * 8 / (16 + 8)) and dice[1] == pytest.approx(1.0)


def test_recipe_eval_postprocess_is_validated_and_flags_override_it():
    recipe = load_recipe("unet", ["eval.postprocess.min_size=12", "eval.postprocess.fill_holes=true"])
    assert recipe.eval.postprocess.min_size == 12 and recipe.eval.postprocess.fill_holes
    with pytest.raises(MedsegError):
        load_recipe("unet", ["eval.postprocess.min_size=-3"])
    defaults = recipe.eval.postprocess.model_dump()
    assert from_flags(None, None, None, defaults) == PostProcessing(min_size=12, fill_holes=True)
    assert from_flags(True, 0, None, defaults) == PostProcessing(largest_component=True, fill_holes=True)
    assert from_flags(None, None, True) == PostProcessing(fill_holes=True)


def test_evaluate_scores_post_processed_labels_and_records_them(tiny_run, tmp_path):
    from medseg.engine.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(tiny_run.path, run)
    folder = evaluate(run, overlays=0, workers=0)
    plain = json.loads((folder / "summary.json").read_text())
    assert plain["decision"]["postprocess"]["min_size"] == 0
    assert any(row["predicted_pixels"] != "0" for row in csv.DictReader((folder / "per_case.csv").open()))
    # the recipe's eval.postprocess: a min size larger than any image removes every predicted pixel
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"]["postprocess"] = {"min_size": 10**6}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = medseg_inprocess("evaluate", str(run), "--overlays", "0")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["decision"]["postprocess"]["min_size"] == 10**6
    assert summary["decision"]["threshold_source"] == "default"
    rows = list(csv.DictReader((folder / "per_case.csv").open()))
    assert rows and all(row["predicted_pixels"] == "0" for row in rows)
    assert summary["metrics"]["precision"]["value"] == pytest.approx(1.0)  # no prediction: no false positive
    # a flag overrides the recipe's value and keeps the rest
    result = medseg_inprocess("evaluate", str(run), "--overlays", "0", "--min-size", "0", "--fill-holes")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((folder.with_name(folder.name + "-post") / "summary.json").read_text())  # not the recipe's
    assert summary["decision"]["postprocess"]["min_size"] == 0 and summary["decision"]["postprocess"]["fill_holes"]
