"""M2SNet end to end on real Kvasir-SEG images: multi-scale training with structure + LossNet, then the
polyp protocol."""

import csv
import json

from conftest import run_cli
from medseg.engine.run import Run


def test_short_multiscale_training_lowers_the_loss_and_pranet_reports_seven_metrics(kvasir_subset, tmp_path):
    tiny = ["data.size=64", "data.multiscale=[32, 64]", "train.epochs=4", "train.batch_size=4", "data.num_workers=0",
            "optim.lr=0.01", "data.split={val: 0.15, test: 0.15, seed: 0}"]
    trained = run_cli("train", "--recipe", "m2snet", "--data", str(kvasir_subset), "--out", str(tmp_path), "--name",
                      "m2snet", *[arg for item in tiny for arg in ("--set", item)])
    assert trained.returncode == 0, trained.stderr[-2000:]
    run = Run(tmp_path / "m2snet")
    # no local Res2Net or VGG-16 file here: the paper's pretrained starts are missing, and that is said, not hidden
    warned = ["m2snet starts from random weights, the paper from an ImageNet Res2Net-50-v1b",
              "lossnet runs on a random VGG-16, the paper's is ImageNet-trained: give loss.1.vgg_weights=FILE"]
    for text in warned:
        assert f"warning: {text}" in trained.stdout
        assert any(note.startswith(text) for note in run.config()["run"]["warnings"])
    assert "UserWarning" not in trained.stderr  # said once, in the header, not again by Python's warnings
    with run.metrics_file.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert {"lr_encoder", "lr_decoder"} <= set(rows[0])
    assert float(rows[0]["lr_encoder"]) == float(rows[0]["lr_decoder"]) / 10  # the backbone at 0.1x
    assert json.loads((run.model_dir / "config.json").read_text())["checkpoint"] == "last.ckpt"

    result = run_cli("evaluate", str(run.path), "--data", str(kvasir_subset), "--overlays", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run.path / "eval" / "kvasir16" / "summary.json").read_text())
    assert summary["protocol"]["name"] == "pranet"
    assert list(summary["metrics"]) == ["mean_dice", "mean_iou", "wfm", "sm", "mean_em", "max_em", "mae"]
    assert all(0 <= v["value"] <= 1 for v in summary["metrics"].values())
    header = (run.path / "eval" / "kvasir16" / "per_case.csv").read_text().splitlines()[0]
    assert header.endswith("mean_dice,mean_iou,wfm,sm,mean_em,max_em,mae")
