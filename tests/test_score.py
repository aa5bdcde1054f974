"""`medseg score`: a folder written by `medseg predict --probabilities` scores exactly what evaluate reports for the
same run and cases; other prediction formats; pixel spacing from the files; one-line refusals."""

import json
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import medseg_inprocess, refused
from medseg.engine.evaluate import evaluate
from medseg.engine.predict import predict
from medseg.engine.score import parse_spacing, score
from medseg.errors import MedsegError


def metric_columns(folder):
    """per_case.csv's rows with its metric columns (the pixel counts aside)."""
    rows = (folder / "per_case.csv").read_text().splitlines()
    return [",".join(row.split(",")[:3] + row.split(",")[5:]) for row in rows]


@pytest.fixture(scope="module")
def predicted(tiny_run, phantom, tmp_path_factory):
    """The tiny run's test split predicted with probability maps, as a user would (predict at 0.5)."""
    stems = json.loads(tiny_run.splits_file.read_text())["test"]
    out = tmp_path_factory.mktemp("predicted") / "pred"
    predict(tiny_run.path, [str(phantom / "images" / f"{s}.png") for s in stems], out, probabilities=True)
    return out


@pytest.mark.parametrize("protocol", ["nnunet", "pranet"])
def test_score_of_predict_outputs_reproduces_evaluate_exactly(tiny_run, phantom, predicted, tmp_path, protocol):
    evaluated = evaluate(tiny_run.path, phantom, protocol, overlays=0, workers=0)
    scored = score(predicted, phantom, protocol, split="test", splits_file=tiny_run.splits_file,
                   out=tmp_path / "score", overlays=0)
    ours, theirs = (json.loads((f / "summary.json").read_text()) for f in (scored, evaluated))
    # json text: NaN compares equal to NaN, every other value must be the same float
    assert json.dumps(ours["metrics"], sort_keys=True) == json.dumps(theirs["metrics"], sort_keys=True)
    assert ours["protocol"] == theirs["protocol"] and ours["cases"] == theirs["cases"] > 0
    assert metric_columns(scored) == metric_columns(evaluated)
    if protocol == "nnunet":
        assert {"hd95", "assd", "nsd", "dice"} <= set(ours["metrics"])
        assert ours["spacing"] == theirs["spacing"] == {"source": "default (1: distances in pixels)",
                                                        "row_column": [[1.0, 1.0]]}
    assert ours["inputs"] == {"probability map and label map": ours["cases"]}


def test_float_tiff_npy_maps_and_01_masks_score_the_same(tiny_run, phantom, predicted, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for index, prob in enumerate(sorted(predicted.glob("*_prob.png"))):
        stem = prob.name[: -len("_prob.png")]
        values = np.asarray(Image.open(prob)).astype(np.float32) / 255
        if index % 2:
            np.save(other / f"{stem}_prob.npy", values)
        else:
            tifffile.imwrite(other / f"{stem}_prob.tif", values)
        mask = (np.asarray(Image.open(predicted / f"{stem}.png")) > 0).astype(np.uint8)
        tifffile.imwrite(other / f"{stem}.tif", mask)  # 0/1
    common = dict(split="test", splits_file=tiny_run.splits_file, overlays=0)
    for protocol in ("nnunet", "pranet"):
        first = score(predicted, phantom, protocol, out=tmp_path / f"png-{protocol}", **common)
        second = score(other, phantom, protocol, out=tmp_path / f"other-{protocol}", **common)
        a, b = (json.loads((f / "summary.json").read_text())["metrics"] for f in (first, second))
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    maps_only = tmp_path / "maps"
    shutil.copytree(predicted, maps_only, ignore=lambda d, names: [n for n in names if not n.endswith("_prob.png")])
    scored = score(maps_only, phantom, "pranet", out=tmp_path / "maps-score", **common)
    summary = json.loads((scored / "summary.json").read_text())
    assert summary["inputs"] == {"probability map": summary["cases"]} and summary["num_classes"] == 1
    # map metrics read the maps alone: the masks beside them change nothing
    assert json.dumps(summary["metrics"], sort_keys=True) == json.dumps(a, sort_keys=True)


def test_score_command_writes_the_evaluate_report(tiny_run, phantom, predicted, tmp_path):
    out = tmp_path / "report"
    result = medseg_inprocess("score", str(predicted), "--data", str(phantom), "--split", "test", "--splits",
                              str(tiny_run.splits_file), "--protocol", "nnunet", "--overlays", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hd95" in result.stdout and "report.md" in result.stdout
    report = (out / "report.md").read_text()
    assert report.startswith("# Score: pred on data (test)") and "| hd95 |" in report and "SYNTHETIC" in report
    assert "NSD tolerance 2.0" in report and len(list((out / "overlays").glob("*.png"))) == 2
    rows = (out / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("stem,height,width,mask_pixels,predicted_pixels,dice") and "hd95" in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["name"] == "unet" and summary["predict_settings"]["threshold"] == 0.5


def test_pixel_spacing_from_the_mask_files(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    for folder in (data / "images", data / "masks", pred):
        folder.mkdir(parents=True)
    truth = np.zeros((16, 16), np.uint8)
    truth[4:10, 4:10] = 255
    shifted = np.roll(truth, 2, axis=1)
    Image.fromarray(np.stack([truth] * 3, -1)).save(data / "images" / "a.png")
    Image.fromarray(truth).save(data / "masks" / "a.png", dpi=(254, 127))  # 0.1 mm columns, 0.2 mm rows
    Image.fromarray(shifted).save(pred / "a.png")
    folder = score(pred, data, "nnunet", spacing="file", overlays=0)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["spacing"] == {"source": "each mask's recorded resolution, in mm", "row_column": [[0.2, 0.1]]}
    assert summary["metrics"]["hd95"]["value"] == pytest.approx(0.2)  # two columns of 0.1 mm
    assert summary["inputs"] == {"label map": 1}
    explicit = json.loads((score(pred, data, "nnunet", spacing="3", overlays=0, out=tmp_path / "s3")
                           / "summary.json").read_text())
    assert explicit["metrics"]["hd95"]["value"] == pytest.approx(6.0)
    Image.fromarray(truth).save(data / "masks" / "a.png")  # no pHYs chunk
    with pytest.raises(MedsegError, match="records no resolution"):
        score(pred, data, "nnunet", spacing="file", overlays=0)


def test_parse_spacing():
    assert parse_spacing(None) is None and parse_spacing("file") == "file"
    assert parse_spacing("0.5") == (0.5, 0.5) and parse_spacing("0.5,0.8") == (0.5, 0.8)
    for bad in ("0", "-1", "a", "1,2,3", "nan"):
        with pytest.raises(MedsegError, match="--spacing takes"):
            parse_spacing(bad)


def test_score_refusals_are_one_line(tiny_run, phantom, predicted, tmp_path):
    splits = ("--split", "test", "--splits", str(tiny_run.splits_file))
    folder = tmp_path / "pred"
    shutil.copytree(predicted, folder)
    stems = json.loads(tiny_run.splits_file.read_text())["test"]
    (folder / f"{stems[0]}.png").unlink()
    (folder / f"{stems[0]}_prob.png").unlink()
    refused(medseg_inprocess("score", str(folder), "--data", str(phantom), *splits),
            "1 of", "have no prediction", stems[0])
    refused(medseg_inprocess("score", str(predicted), "--data", str(phantom)), "have no prediction")  # all cases
    shutil.copy(predicted / f"{stems[0]}.png", folder)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(folder / f"{stems[1]}.png")
    refused(medseg_inprocess("score", str(folder), "--data", str(phantom), *splits),
            f"{stems[1]}.png is 5x7 but its mask is")
    (folder / f"{stems[1]}.png").write_bytes(b"not a png")
    refused(medseg_inprocess("score", str(folder), "--data", str(phantom), *splits), "cannot read", stems[1])
    refused(medseg_inprocess("score", str(predicted), "--data", str(phantom), "--spacing", "x"), "--spacing takes")
    refused(medseg_inprocess("score", str(tmp_path / "none"), "--data", str(phantom)), "does not exist")
    refused(medseg_inprocess("score", str(predicted), "--data", str(phantom), "--split", "val"),
            "needs a splits file")


def test_evaluate_spacing_scales_the_distances(tiny_run, phantom, tmp_path):
    result = medseg_inprocess("evaluate", str(tiny_run.path), "--data", str(phantom), "--protocol", "nnunet",
                              "--overlays", "0", "--spacing", "0.5")
    assert result.returncode == 0, result.stderr[-2000:]
    halved = json.loads((tiny_run.path / "eval" / "data-nnunet" / "summary.json").read_text())
    plain = json.loads((evaluate(tiny_run.path, phantom, "nnunet", overlays=0, workers=0) / "summary.json").read_text())
    assert halved["spacing"] == {"source": "--spacing", "row_column": [[0.5, 0.5]]}
    for metric in ("hd95", "assd"):
        assert halved["metrics"][metric]["value"] == pytest.approx(plain["metrics"][metric]["value"] / 2, rel=1e-5)
    assert halved["metrics"]["dice"] == plain["metrics"]["dice"]


def test_score_help_has_an_example():
    from typer.testing import CliRunner

    from medseg.cli import app

    help_text = CliRunner().invoke(app, ["score", "--help"], terminal_width=200)
    assert help_text.exit_code == 0 and "Example: medseg score" in help_text.stdout and "--spacing" in help_text.stdout
