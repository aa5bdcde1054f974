"""The aggregation and report of a multi-model study, on synthetic per-case rows with fixed random numbers:
3 models (a reference, one much better, one about as good), 2 datasets (a held-out fold: each case in one fold
per seed; an external set scored whole by every cell), 2 seeds x 2 folds."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from medseg.engine.study_report import (
    aggregate,
    higher_is_better,
    holm,
    paired_tests,
    plots,
    read_results_csv,
    summarize,
    write_report,
    write_results_csv,
    write_summary_csv,
)
from medseg.errors import MedsegError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COSTS = {"unet": {"params": 7_760_000, "gflops": 14.0, "latency_ms_b1": 3.2},
         "better": {"params": 31_000_000, "gflops": 55.5, "latency_ms_b1": 9.87}}  # "similar" has no costs


def synthetic_rows() -> list[dict]:
    """kvasir: 16 cases, fold 0 holds cases 0-7 and fold 1 cases 8-15; cvc: 10 cases scored by every cell.
    `better` adds 0.08-0.12 to the reference's dice, `similar` +- 0.01 noise; mae = 0.3 * (1 - dice)."""
    rng = np.random.RandomState(0)
    rows = []
    for dataset, cases in (("kvasir", 16), ("cvc", 10)):
        for seed in (0, 1):
            for fold in (0, 1):
                held = range(fold * 8, fold * 8 + 8) if dataset == "kvasir" else range(cases)
                for c in held:
                    base = float(rng.uniform(0.55, 0.8))
                    scores = {"unet": base, "better": base + float(rng.uniform(0.08, 0.12)),
                              "similar": base + float(rng.uniform(-0.01, 0.01))}
                    for model, dice in scores.items():
                        rows.append({"model": model, "dataset": dataset, "seed": seed, "fold": fold,
                                     "case": f"{dataset}_{c:02d}", "dice": dice, "iou": dice / (2 - dice),
                                     "mae": 0.3 * (1 - dice)})
    rows[3]["dice"] = math.nan  # one empty case of the reference on kvasir, seed 0 fold 0 (the protocol's rule)
    return rows


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return synthetic_rows()


def _row(model, dataset, seed, fold, case, **metrics) -> dict:
    return {"model": model, "dataset": dataset, "seed": seed, "fold": fold, "case": case, **metrics}


def test_summary_hand_example():
    rows = [_row("a", "d", 0, 0, "x", dice=0.8), _row("a", "d", 0, 0, "y", dice=0.6),
            _row("a", "d", 0, 0, "z", dice=math.nan),  # left out of its cell's mean: (0.8 + 0.6) / 2 = 0.7
            _row("a", "d", 1, 0, "x", dice=0.5), _row("a", "d", 1, 0, "y", dice=0.3)]  # cell mean 0.4
    (summary,) = summarize(rows)
    assert summary["model"] == "a" and summary["dataset"] == "d" and summary["metric"] == "dice"
    assert summary["n"] == 2
    assert summary["mean"] == pytest.approx(0.55)  # (0.7 + 0.4) / 2
    assert summary["std"] == pytest.approx(0.15)  # population std of {0.7, 0.4}: sqrt(0.15^2); ddof=1 gives 0.212


def test_summary_of_one_group_matches_an_independent_computation(rows):
    summary = summarize(rows)
    assert {(s["model"], s["dataset"], s["metric"]) for s in summary} == {
        (m, d, k) for m in ("unet", "better", "similar") for d in ("kvasir", "cvc") for k in ("dice", "iou", "mae")}
    assert all(s["n"] == 4 for s in summary)
    cell_means = []
    for seed in (0, 1):
        for fold in (0, 1):
            values = [r["dice"] for r in rows if (r["model"], r["dataset"], r["seed"], r["fold"])
                      == ("unet", "kvasir", seed, fold) and not math.isnan(r["dice"])]
            assert len(values) == (7 if (seed, fold) == (0, 0) else 8)
            cell_means.append(sum(values) / len(values))
    (group,) = [s for s in summary if (s["model"], s["dataset"], s["metric"]) == ("unet", "kvasir", "dice")]
    assert group["mean"] == pytest.approx(statistics.fmean(cell_means), abs=1e-12)
    assert group["std"] == pytest.approx(statistics.pstdev(cell_means), abs=1e-12)


def test_holm_hand_example():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01; 2 x 0.03; max(0.06, 0.04)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped at 1, and monotone: 0.6 x 1 is raised to the 1.0 before it
    adjusted = holm([0.01, math.nan, 0.04])  # a test not run is not in the family
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([]) == []


def test_wilcoxon_p_equals_scipy_on_the_matched_pairs(rows):
    tests = paired_tests(rows, "unet", "dice")
    assert [(t["dataset"], t["model"]) for t in tests] == [("kvasir", "better"), ("kvasir", "similar"),
                                                           ("cvc", "better"), ("cvc", "similar")]
    by_pair = {(t["dataset"], t["model"]): t for t in tests}
    for dataset in ("kvasir", "cvc"):
        for model in ("better", "similar"):
            ours = {(r["seed"], r["fold"], r["case"]): r["dice"] for r in rows
                    if r["model"] == model and r["dataset"] == dataset}
            theirs = {(r["seed"], r["fold"], r["case"]): r["dice"] for r in rows
                      if r["model"] == "unet" and r["dataset"] == dataset and not math.isnan(r["dice"])}
            keys = [k for k in ours if k in theirs]
            x, y = np.array([ours[k] for k in keys]), np.array([theirs[k] for k in keys])
            t = by_pair[(dataset, model)]
            assert t["n_pairs"] == len(keys) == (31 if dataset == "kvasir" else 40)  # the NaN case is unpaired
            expected = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue
            assert t["p"] == pytest.approx(expected, rel=1e-12)
            assert t["median_difference"] == pytest.approx(float(np.median(x - y)))
            assert t["reason"] == ""
        family = [by_pair[(dataset, m)]["p"] for m in ("better", "similar")]
        assert [by_pair[(dataset, m)]["p_holm"] for m in ("better", "similar")] == pytest.approx(holm(family))
        better = by_pair[(dataset, "better")]
        assert better["p"] < 0.05 and better["p_holm"] < 0.05
        assert better["favours"] == "model" and 0.08 < better["mean_cell_difference"] < 0.12
        assert better["cells_paired"] == 4
        assert by_pair[(dataset, "similar")]["p"] > 1e-3 > better["p"]


def test_fewer_than_six_pairs_or_no_differences_give_nan_with_a_reason():
    rows = []
    for c in range(5):
        rows += [_row("ref", "d", 0, None, f"c{c}", dice=0.5), _row("m", "d", 0, None, f"c{c}", dice=0.9)]
    for c in range(8):  # a second dataset where the model equals the reference everywhere
        rows += [_row("ref", "e", 0, None, f"c{c}", dice=0.1 * c), _row("m", "e", 0, None, f"c{c}", dice=0.1 * c)]
    rows += [_row("m", "only", 0, None, "c0", dice=0.7)]  # the reference was not scored on this one
    first, second, third = paired_tests(rows, "ref", "dice")
    assert first["n_pairs"] == 5 and math.isnan(first["p"]) and math.isnan(first["p_holm"])
    assert "fewer than 6 matched pairs (5)" in first["reason"]
    assert second["n_pairs"] == 8 and math.isnan(second["p"]) and "all 8 differences are zero" in second["reason"]
    assert second["favours"] == "neither"
    assert math.isnan(third["p"]) and "has no scores on only" in third["reason"]


def test_nan_cases_are_not_paired_and_few_nonzero_differences_give_no_p():
    rows = []
    for c in range(9):
        ref = 0.5 if c < 5 else math.nan  # 4 of 9 reference cases empty
        rows += [_row("ref", "d", 1, 2, f"c{c}", dice=ref), _row("m", "d", 1, 2, f"c{c}", dice=0.6)]
    (test,) = paired_tests(rows, "ref", "dice")
    assert test["n_pairs"] == 5 and math.isnan(test["p"])
    rows = [_row(m, "d", 0, 0, f"c{c}", dice=0.5 + (0.1 if m == "m" and c < 3 else 0.0))
            for c in range(10) for m in ("ref", "m")]
    (test,) = paired_tests(rows, "ref", "dice")
    assert test["n_pairs"] == 10 and math.isnan(test["p"]) and "3 of 10 pairs" in test["reason"]


def test_unknown_reference_metric_or_duplicate_case_is_a_user_error(rows):
    with pytest.raises(MedsegError, match="reference model 'nnunet'"):
        paired_tests(rows, "nnunet", "dice")
    with pytest.raises(MedsegError, match="no metric 'hd95'"):
        paired_tests(rows, "unet", "hd95")
    with pytest.raises(MedsegError, match="appears twice"):
        paired_tests(rows + [dict(rows[0])], "unet", "dice")


def test_results_csv_round_trips(tmp_path, rows):
    extra = [_row("unet", "external", 3, None, "e1", dice=0.25, iou=math.nan, mae=0.1),
             _row("unet", "external", 3, "", "e2", dice=1 / 3)]  # no fold (no cross-validation), no iou or mae
    path = write_results_csv(rows + extra, tmp_path / "results.csv")
    assert path.read_text().splitlines()[0] == "model,dataset,seed,fold,case,dice,iou,mae"
    back = read_results_csv(path)
    assert len(back) == len(rows) + 2
    for original, read in zip(rows + extra, back):
        assert list(read)[:5] == ["model", "dataset", "seed", "fold", "case"]
        assert read["seed"] == original["seed"] and read["case"] == original["case"]
        assert read["fold"] == (original["fold"] if original["fold"] != "" else None)
        for metric in ("dice", "iou", "mae"):
            value = original.get(metric, math.nan)
            assert (math.isnan(read[metric]) and math.isnan(value)) or read[metric] == value  # exact, not approx
    assert back[-1]["fold"] is None and back[-2]["fold"] is None and math.isnan(back[-1]["iou"])
    assert summarize(back) == summarize([{**r, "iou": r.get("iou", math.nan), "mae": r.get("mae", math.nan)}
                                         for r in rows + extra])


def test_mae_is_lower_is_better_in_the_difference_sign(tmp_path, rows):
    assert not higher_is_better("mae") and not higher_is_better("hd95") and not higher_is_better("assd")
    assert higher_is_better("dice") and higher_is_better("mean_dice") and higher_is_better("wfm")
    by_pair = {(t["dataset"], t["model"]): t for t in paired_tests(rows, "unet", "mae")}
    better = by_pair[("cvc", "better")]
    assert better["mean_cell_difference"] < 0 and better["median_difference"] < 0  # model - reference
    assert better["favours"] == "model" and better["p"] < 0.05
    worse = [_row(r["model"], r["dataset"], r["seed"], r["fold"], r["case"],
                  mae=r["mae"] + (0.05 if r["model"] == "similar" else 0.0)) for r in rows]
    by_pair = {(t["dataset"], t["model"]): t for t in paired_tests(worse, "unet", "mae")}
    assert by_pair[("cvc", "similar")]["mean_cell_difference"] > 0
    assert by_pair[("cvc", "similar")]["favours"] == "reference"
    out = aggregate(rows, tmp_path / "mae", reference="unet", main_metric="mae", costs=COSTS)
    report = out["report"].read_text()
    assert "Main metric: **mae** (lower is better)" in report
    assert "a negative difference favours the model" in report
    assert "| difference to unet (negative is better) |" in report
    row = f"| better | 4 | {_mean_std(out, 'better', 'cvc', 'mae')} | {better['mean_cell_difference']:+.4f} |"
    assert row in report


def _mean_std(out, model, dataset, metric) -> str:
    rows = read_results_csv_summary(out["summary"])
    (s,) = [r for r in rows if (r["model"], r["dataset"], r["metric"]) == (model, dataset, metric)]
    return f"{float(s['mean']):.4f} ± {float(s['std']):.4f}"


def read_results_csv_summary(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _valid_png(path) -> bool:
    with open(path, "rb") as handle:
        if handle.read(8) != PNG_SIGNATURE:
            return False
    with Image.open(path) as picture:
        picture.verify()
        return picture.format == "PNG"


def test_aggregate_writes_summary_report_and_plots(tmp_path, rows):
    results = write_results_csv(rows, tmp_path / "results.csv")
    missing = ["similar seed 2 fold 0: CUDA out of memory", "better seed 2 fold 1: did not run"]
    out = aggregate(results, tmp_path / "study", reference="unet", main_metric="dice", costs=COSTS, missing=missing,
                    title="Polyp study", description="Three models on Kvasir-SEG folds and CVC-ClinicDB.")
    folder = tmp_path / "study"
    assert out["summary"] == folder / "summary.csv" and out["report"] == folder / "report.md"
    assert out["plots"] == folder / "plots" and out["tests"] == folder / "tests.csv"
    names = sorted(p.name for p in (folder / "plots").iterdir())
    assert names == ["box_cvc_dice.png", "box_kvasir_dice.png", "efficiency_cvc.png", "efficiency_kvasir.png"]
    assert sorted(p.name for p in out["pictures"]) == names
    assert all(_valid_png(folder / "plots" / name) for name in names)
    summary = read_results_csv_summary(out["summary"])
    assert list(summary[0]) == ["model", "dataset", "metric", "mean", "std", "n"] and len(summary) == 18
    assert [r["p"] for r in read_results_csv_summary(out["tests"])][:1] != ["nan"]

    report = out["report"].read_text()
    tests = {(t["dataset"], t["model"]): t for t in paired_tests(rows, "unet", "dice")}
    assert report.startswith("# Polyp study\n\nThree models on Kvasir-SEG folds and CVC-ClinicDB.")
    header = "| model | cells | dice mean ± std | difference to unet (positive is better) | Wilcoxon p | Holm p |"
    assert report.count(header) == 2
    assert f"| unet | 4 | {_mean_std(out, 'unet', 'kvasir', 'dice')} | (reference) |  |  | 7.76 M | 14.00 | 3.20 |" \
        in report
    t = tests[("kvasir", "better")]
    p = f"{t['p']:.4f}" if t["p"] >= 1e-3 else f"{t['p']:.1e}"
    holm_p = f"{t['p_holm']:.4f}" if t["p_holm"] >= 1e-3 else f"{t['p_holm']:.1e}"
    assert (f"| better | 4 | {_mean_std(out, 'better', 'kvasir', 'dice')} | {t['mean_cell_difference']:+.4f} | {p} "
            f"| {holm_p} | 31.00 M | 55.50 | 9.87 |") in report
    assert "| similar | 4 |" in report and "| n/a | n/a | n/a |" in report  # no costs known for "similar"
    assert ("Wilcoxon signed-rank test over per-case scores matched on seed, fold and case, two-sided; "
            "Holm correction across the models compared with unet") in report
    assert "population standard deviation (ddof=0)" in report and "not the difference of the summary means" in report
    assert "| model | iou (↑) | mae (↓) |" in report
    assert f"| better | {_mean_std(out, 'better', 'cvc', 'iou')} | {_mean_std(out, 'better', 'cvc', 'mae')} |" in report
    assert "](plots/box_kvasir_dice.png)" in report and "](plots/efficiency_cvc.png)" in report
    assert "## Missing cells" in report and all(f"- {cell}" in report for cell in missing)


def test_aggregate_again_replaces_the_plots_and_skips_efficiency_without_costs(tmp_path, rows):
    aggregate(rows, tmp_path, reference="unet", main_metric="dice", costs=COSTS)
    out = aggregate(rows, tmp_path, reference="unet", main_metric="iou", costs={})
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["box_cvc_iou.png", "box_kvasir_iou.png"]
    report = out["report"].read_text()
    assert "efficiency" not in report and "Missing cells" not in report
    assert "| better | 4 |" in report and report.count("| n/a | n/a | n/a |") == 6


def test_plot_and_report_names_are_slugged_and_unknown_metric_fails(tmp_path):
    rows = [_row(m, "centre A/test", 0, None, f"c{c}", **{"mean_dice": 0.5 + 0.01 * c + (m == "b") * 0.2})
            for c in range(8) for m in ("a", "b")]
    summary = summarize(rows)
    drawn = plots(rows, summary, {"b": {"gflops": 2.0}}, "mean_dice", tmp_path / "pictures")
    assert drawn["centre A/test"]["box"] == tmp_path / "pictures" / "box_centre-A-test_mean_dice.png"
    assert _valid_png(drawn["centre A/test"]["efficiency"])
    report = write_report(tmp_path / "report.md", title="t", study_description="", rows=rows, summary=summary,
                          tests=paired_tests(rows, "a", "mean_dice"), costs=None, reference="a",
                          main_metric="mean_dice", missing=[], plots=drawn)
    text = report.read_text()
    assert "## centre A/test" in text and "](pictures/box_centre-A-test_mean_dice.png)" in text
    assert "| b | 1 | 0.7350 ± 0.0000 | +0.2000 | 0.0078 | 0.0078 |" in text
    with pytest.raises(MedsegError, match="no metric 'dice'"):
        aggregate(rows, tmp_path / "x", reference="a", main_metric="dice")
    write_summary_csv(summary, tmp_path / "summary.csv")
    assert (tmp_path / "summary.csv").read_text().splitlines()[1] == "a,centre A/test,mean_dice,0.535,0.0,1"
