"""Sliding-window inference, flip TTA, fold ensembles (medseg.engine.inference) and training on crops
(`data.crop`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import TINY, run_cli
from medseg import create_model
from medseg.data.transforms import Preprocessing
from medseg.engine.inference import InferencePlan, Tiling, build_plan, parse_tile, stored_tiling
from medseg.errors import MedsegError
from medseg.models import save_model


class NetPredictor:
    """A bare network behind Predictor's inference interface (what InferencePlan uses), to test the plan on networks
    with known symmetries."""

    def __init__(self, net: nn.Module, channels: int = 1, folder: str = "net"):
        self.net = net.eval()
        self.device = torch.device("cpu")
        self.preprocessing = Preprocessing(size=(64, 64), in_channels=channels, normalize="none")
        self.size_multiple = 1
        self.num_classes = 1
        self.config = {"name": "test-net", "preprocessing": self.preprocessing.to_dict()}
        self.folder = Path(folder)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(images))


def pointwise(seed: int = 0) -> nn.Module:
    """A 1x1 convolution: translation- and flip-equivariant, so tiles and flips must change nothing."""
    torch.manual_seed(seed)
    return nn.Conv2d(1, 1, 1)


class WithRamp(nn.Module):
    """A 1x1 convolution plus a left-to-right ramp: not flip-equivariant."""

    def __init__(self):
        super().__init__()
        self.conv = pointwise()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.linspace(-2, 2, x.shape[-1])


class WindowMean(nn.Module):
    """Each window's output is the mean of its input: a network whose answer depends on where the window is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:]).logit(eps=1e-6)


def saved_unet(folder: Path, num_classes: int = 1, crop: tuple[int, int] | None = None, seed: int = 0) -> Path:
    """An untrained tiny U-Net as a model folder (what `medseg train` writes, without the training)."""
    torch.manual_seed(seed)
    model = create_model("unet", 3, num_classes, base_channels=4)
    prep = Preprocessing(size=(64, 64), in_channels=3, normalize="imagenet", crop=crop)
    return save_model(model, folder, extra={"preprocessing": prep.to_dict(), "size_multiple": 16})


def test_tiled_probabilities_have_the_size_of_an_image_that_is_no_multiple(tmp_path):
    plan = build_plan([saved_unet(tmp_path / "m")], device="cpu", precision="32", tile="64", overlap=0.5)
    image = torch.rand(3, 565, 584)
    probs = plan.probabilities_at_original_size(image)
    assert probs.shape == (1, 565, 584) and probs.device.type == "cpu"
    assert 0 <= float(probs.min()) and float(probs.max()) <= 1
    small = plan.probabilities_at_original_size(torch.rand(3, 40, 50))  # smaller than a tile: padded, cropped back
    assert small.shape == (1, 40, 50)


def test_tiles_of_a_pointwise_network_equal_the_whole_image():
    image = torch.rand(1, 150, 203)
    whole = InferencePlan([NetPredictor(pointwise())], native=True).probabilities_at_original_size(image)
    for overlap in (0.0, 0.25, 0.5):
        tiled = InferencePlan([NetPredictor(pointwise())], Tiling((48, 64), overlap)).probabilities_at_original_size(
            image)
        assert torch.allclose(tiled, whole, atol=1e-5), overlap


def test_gaussian_blending_is_normalised_and_weights_each_window_centre_most():
    from monai.inferers import sliding_window_inference

    plan = InferencePlan([NetPredictor(WindowMean())], Tiling((32, 32), 0.5))
    assert torch.allclose(plan.probabilities_at_original_size(torch.full((1, 100, 90), 0.7)), torch.tensor(0.7),
                          atol=1e-4)  # the weights sum to one everywhere: a constant answer stays constant
    ramp = torch.linspace(0.05, 0.95, 100).view(1, 100, 1).expand(1, 100, 90).contiguous()
    gaussian = plan.probabilities_at_original_size(ramp)[0, :, 45]
    flat = sliding_window_inference(ramp[None], (32, 32), 4, NetPredictor(WindowMean()).probabilities, 0.5,
                                    mode="constant")[0, 0, :, 45]
    for start in (16, 32, 48):  # windows start every 16 rows; at a window's centre its own answer dominates
        own = float(ramp[0, start:start + 32].mean())
        centre = start + 16
        assert abs(float(gaussian[centre]) - own) < 0.2 * abs(float(flat[centre]) - own)


def test_flip_tta_changes_nothing_for_a_flip_equivariant_network_and_something_otherwise():
    image = torch.rand(1, 37, 53)
    for native, tiling in ((True, None), (False, Tiling((32, 32), 0.5))):
        plain = InferencePlan([NetPredictor(pointwise())], tiling, native=native)
        flips = InferencePlan([NetPredictor(pointwise())], tiling, "flips", native=native)
        assert torch.allclose(flips.probabilities_at_original_size(image),
                              plain.probabilities_at_original_size(image), atol=1e-5)
    ramp_plain = InferencePlan([NetPredictor(WithRamp())], native=True).probabilities_at_original_size(image)
    ramp_flips = InferencePlan([NetPredictor(WithRamp())], tta="flips", native=True).probabilities_at_original_size(
        image)
    assert float((ramp_flips - ramp_plain).abs().max()) > 0.1
    with pytest.raises(MedsegError, match="--tta must be one of"):
        InferencePlan([NetPredictor(pointwise())], tta="rot90")


def test_an_ensemble_of_two_copies_of_one_run_equals_the_run(tmp_path):
    first = saved_unet(tmp_path / "fold0")
    copy = shutil.copytree(first, tmp_path / "fold1")
    image = torch.rand(3, 70, 90)
    single = build_plan([first], "cpu", precision="32")
    pair = build_plan([first, copy], "cpu", precision="32")
    assert torch.allclose(pair.probabilities_at_original_size(image), single.probabilities_at_original_size(image),
                          atol=1e-6)
    assert pair.to_dict()["members"] == [str(first.resolve()), str(copy.resolve())]
    other = build_plan([first, saved_unet(tmp_path / "other", seed=1)], "cpu", precision="32")
    assert not torch.allclose(other.probabilities_at_original_size(image), single.probabilities_at_original_size(image))


def test_mismatched_members_and_bad_tiling_options_are_refused_in_one_line(tmp_path):
    binary = saved_unet(tmp_path / "binary")
    with pytest.raises(MedsegError, match="disagree on classes: 1 in .*, 3 in"):
        build_plan([binary, saved_unet(tmp_path / "three", num_classes=3)], "cpu")
    with pytest.raises(MedsegError, match="disagree on training crop"):
        build_plan([binary, saved_unet(tmp_path / "crop", crop=(32, 32))], "cpu")
    with pytest.raises(MedsegError, match="given twice"):
        build_plan([binary, binary], "cpu")
    with pytest.raises(MedsegError, match="not a multiple of 16.*--tile 96x96"):
        build_plan([binary], "cpu", tile="100")
    with pytest.raises(MedsegError, match="--overlap applies to tiled inference"):
        build_plan([binary], "cpu", overlap=0.5)
    with pytest.raises(MedsegError, match=r"--overlap must be a fraction"):
        build_plan([binary], "cpu", tile="64", overlap=1.0)
    with pytest.raises(MedsegError, match="give one of them"):
        build_plan([binary], "cpu", tile="64", native=True)
    with pytest.raises(MedsegError, match="give a tile size"):
        parse_tile("big")
    assert parse_tile("off") is None and parse_tile("256x320") == (256, 320) and parse_tile("64") == (64, 64)


def test_a_crop_trained_model_tiles_by_default_with_its_crop(tmp_path):
    folder = saved_unet(tmp_path / "crops", crop=(32, 48))
    plan = build_plan([folder], "cpu")
    assert plan.tiling == Tiling((32, 48), 0.5) == stored_tiling(plan.reference.config)
    assert build_plan([folder], "cpu", tile="off").tiling is None
    assert build_plan([folder], "cpu", overlap=0.25).tiling == Tiling((32, 48), 0.25)
    assert build_plan([folder], "cpu", native=True).tiling is None
    assert build_plan([saved_unet(tmp_path / "whole")], "cpu").tiling is None
    with pytest.raises(MedsegError, match="--save-attention needs one network"):
        plan.record_attention()



def test_the_recipes_eval_tiling_is_stored_and_becomes_the_default(tmp_path):
    from medseg.config import load_recipe
    from medseg.models.saving import config_problem

    recipe = load_recipe("unet", ["eval.tiling={tile: [128, 96], overlap: 0.25}"])
    stored = {"tiling": recipe.eval.tiling.model_dump(mode="json"), "preprocessing": {"crop": [32, 32]}}
    assert stored_tiling(stored) == Tiling((128, 96), 0.25)  # the recipe's tiling wins over the crop
    with pytest.raises(MedsegError, match="eval.tiling.tile: tile must be positive"):
        load_recipe("unet", ["eval.tiling={tile: 0}"])
    config = json.loads((saved_unet(tmp_path / "m") / "config.json").read_text())
    assert config_problem({**config, "tiling": {"tile": "big"}}, for_inference=True).startswith("`tiling` is")
    assert config_problem({**config, "tiling": {"tile": [64, 64], "overlap": 0.5}}, for_inference=True) is None


def test_crop_training_runs_and_the_model_records_the_crop(phantom, tmp_path):
    from medseg.config import load_recipe
    from medseg.data.dataset import SegmentationDataset
    from medseg.data.formats import discover
    from medseg.engine.data import SegmentationDataModule
    from medseg.engine.evaluate import evaluate
    from medseg.engine.train import train

    prep = Preprocessing(size=(64, 64), in_channels=3, crop=(96, 32))  # taller than the 64x64 phantom: padded
    items = SegmentationDataset(discover(phantom).cases[:2], prep, 1, random_crop=True)
    assert items[0]["image"].shape == (3, 96, 32) and items[0]["mask"].shape == (96, 32)
    overrides = (*TINY, "data.crop=32", "train.epochs=1")
    run = train(load_recipe("unet", overrides), phantom, out=tmp_path / "runs", progress=False)
    config = json.loads((run.model_dir / "config.json").read_text())
    assert config["preprocessing"]["crop"] == [32, 32] and config["preprocessing"]["size"] == [64, 64]
    summary = json.loads((evaluate(run.path, phantom, device="cpu", overlays=1) / "summary.json").read_text())
    assert summary["inference"]["mode"] == "tiled" and summary["inference"]["tiling"] == {"tile": [32, 32],
                                                                                         "overlap": 0.5}
    resized = evaluate(run.path, phantom, device="cpu", overlays=0, tile="off")
    assert resized.name.endswith("-resized")
    assert json.loads((resized / "summary.json").read_text())["inference"]["mode"] == "resized"
    with pytest.raises(MedsegError, match="multiples of 16, not \\[24\\]"):
        train(load_recipe("unet", (*TINY, "data.crop=24")), phantom, out=tmp_path / "runs", progress=False)
    with pytest.raises(MedsegError, match="crop and multiscale do not combine"):
        load_recipe("unet", (*TINY, "data.crop=32", "data.multiscale=[32,64]"))
    with pytest.raises(MedsegError, match="crops_per_image needs data.crop"):
        load_recipe("unet", (*TINY, "data.crops_per_image=4"))
    module = SegmentationDataModule(load_recipe("unet", (*TINY, "data.crop=32", "data.crops_per_image=3")), phantom)
    module.setup("fit")
    assert len(module.train_set) == 3 * len(module.splits["train"]) == module.training_images()
    first, again = module.train_set[(0, 0)], module.train_set[(0, len(module.splits["train"]))]  # one case, twice
    assert first["stem"] == again["stem"] and not torch.equal(first["image"], again["image"])


def test_predict_tiles_a_drive_image_at_its_own_size_with_tta_and_an_ensemble(shared_data, tmp_path):
    image = shared_data / "drive" / "images" / "01_test.png"
    first, second = saved_unet(tmp_path / "a"), saved_unet(tmp_path / "b", seed=1)
    out = tmp_path / "pred"
    result = run_cli("predict", str(first), str(image), "--out", str(out), "--tile", "256", "--overlap", "0.25",
                     "--tta", "flips", "--ensemble", str(second), "--device", "cpu", "--probabilities")
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out / "01_test.png").size == (565, 584) and Image.open(out / "01_test_prob.png").size == (565,
                                                                                                             584)
    inference = json.loads((out / "predict.json").read_text())["settings"]["inference"]
    assert inference == {"members": [str(first.resolve()), str(second.resolve())],
                         "tiling": {"tile": [256, 256], "overlap": 0.25}, "tta": "flips", "native": False,
                         "mode": "tiled"}
    refused = run_cli("predict", str(first), str(image), "--out", str(tmp_path / "x"), "--tile", "100")
    assert refused.returncode == 2 and "not a multiple of 16" in refused.stderr and "Traceback" not in refused.stderr


MEMORY_SCRIPT = """
import resource, sys, torch
from torch import nn
sys.path.insert(0, sys.argv[1])
from test_inference_tiling import NetPredictor, pointwise
from medseg.engine.inference import InferencePlan, Tiling
torch.set_num_threads(1)
plan = InferencePlan([NetPredictor(pointwise())], Tiling((512, 512), 0.25), batch_size=4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = torch.rand(1, 6000, 6000)
probs = plan.probabilities_at_original_size(image)
assert probs.shape == (1, 6000, 6000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_a_6000x6000_image_is_tiled_within_a_bounded_memory():
    """Peak RSS growth in a fresh process: the image is 144 MB (float32); the plan keeps a few copies of it (the
    normalised image, MONAI's output and weight maps), never a tensor per tile."""
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(Path(__file__).parent)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    assert growth < 8 * 6000 * 6000 * 4, f"peak RSS grew by {growth / 2**20:.0f} MiB"
