"""The one weight-loading path (`medseg.weights.load_weights`, wired by `medseg.models.pretrained`): encoder
files in timm / torchvision / smp layout built here with random init (nothing is downloaded), loaded into
1-channel networks with the first conv adapted by timm's adapt_input_conv; partial and wrong files refused
with one line naming the file and the tensor."""

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder
from timm.models import adapt_input_conv
from torch import nn

import medseg
from conftest import run_cli
from medseg.errors import MedsegError
from medseg.losses import create_loss
from medseg.models import save_model
from medseg.models.pretrained import load_encoder_weights, load_network_weights
from medseg.weights import LoadReport, load_weights, read_state_dict


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """3-channel reference encoders with random init, saved in their libraries' own key layouts."""
    folder = tmp_path_factory.mktemp("weights")
    states = {
        "res2net50d.pth": timm.create_model("res2net50d", pretrained=False).state_dict(),  # with its fc
        "ghostnet_100.pth": timm.create_model("ghostnet_100", pretrained=False).state_dict(),  # with its classifier
        "resnext50_32x4d.pth": torchvision.models.resnext50_32x4d(weights=None).state_dict(),  # with its fc
    }
    for name, state in states.items():
        torch.save(state, folder / name)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), folder / "resnet50.pth")
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), folder / "densenet121.pth")  # with its fc
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), folder / "resnet34.pth")  # with its fc
    for vgg in ("vgg16_bn", "vgg19"):  # torchvision's layout; the classifier (unused by the slots) is left out
        features = getattr(torchvision.models, vgg)(weights=None).features.state_dict()
        torch.save({f"features.{k}": v for k, v in features.items()}, folder / f"{vgg}.pth")
    for name in ("inception_v3", "xception65", "vit_base_r50_s16_224", "res2net101d"):
        torch.save(timm.create_model(name, pretrained=False).state_dict(), folder / f"{name}.pth")
    for name in ("mobilenet_v2", "efficientnet-b0", "dpn68", "vgg16", "mit_b5"):  # smp's own encoder layouts
        smp_state = get_encoder(name, in_channels=3, weights=None).state_dict()
        save_file({k: v.contiguous() for k, v in smp_state.items()}, str(folder / f"{name}.safetensors"))
    # timm's VGG-16 (fcn8s) under another name than smp's vgg16 file; its 1000-class head is left out (unused)
    timm_vgg = {k: v for k, v in timm.create_model("vgg16", pretrained=False).state_dict().items()
                if not k.startswith("head.fc")}
    torch.save(timm_vgg, folder / "timm_vgg16.pth")
    return {path.stem: path for path in folder.iterdir()}


SWAPPED = {"nhsic": False}  # Fovea-UNet's nHSIC is defined on Ghost modules only
CASES = {  # id: (network, options, its encoder file, another architecture's file): every slot `weights list` names
    "m2snet": ("m2snet", {}, "res2net50d", "resnext50_32x4d"),
    "msnet": ("msnet", {}, "res2net50d", "resnet50"),
    "stsnet": ("stsnet", {}, "resnext50_32x4d", "res2net50d"),
    "deeplabv3_afma": ("deeplabv3_afma", {}, "resnext50_32x4d", "resnet50"),
    "stsnet_resnet50": ("stsnet", {"encoder": "resnet50"}, "resnet50", "dpn68"),
    "stsnet_mobilenet_v2": ("stsnet", {"encoder": "mobilenet_v2"}, "mobilenet_v2", "efficientnet-b0"),
    "stsnet_efficientnet": ("stsnet", {"encoder": "efficientnet-b0"}, "efficientnet-b0", "mobilenet_v2"),
    "stsnet_dpn68": ("stsnet", {"encoder": "dpn68"}, "dpn68", "resnet50"),
    "fovea_ghostnet": ("fovea_unet", {}, "ghostnet_100", "mobilenet_v2"),
    "fovea_ghostnet_11b": ("fovea_unet", {"encoder": "ghostnet"}, "ghostnet_100", "mobilenet_v2"),
    "fovea_vgg16": ("fovea_unet", {"encoder": "vgg16", **SWAPPED}, "vgg16", "resnet50"),
    "fovea_resnet50": ("fovea_unet", {"encoder": "resnet50", **SWAPPED}, "resnet50", "vgg16"),
    "fovea_mobilenet_v2": ("fovea_unet", {"encoder": "mobilenet_v2", **SWAPPED}, "mobilenet_v2", "ghostnet_100"),
    "acsnet": ("acsnet", {}, "resnet34", "resnet50"),
    "fovea_inception_v3": ("fovea_unet", {"encoder": "inception_v3", **SWAPPED}, "inception_v3", "resnet50"),
    "segnet": ("segnet", {}, "vgg16_bn", "vgg19"),
    "doubleunet": ("doubleunet", {}, "vgg19", "vgg16_bn"),
    "deeplabv3plus_xception": ("deeplabv3plus_xception", {}, "xception65", "inception_v3"),
    "fcn8s": ("fcn8s", {}, "timm_vgg16", "resnet34"),
    "transunet": ("transunet", {}, "vit_base_r50_s16_224", "resnet34"),
    "caranet": ("caranet", {}, "res2net101d", "res2net50d"),
    "denseaspp": ("denseaspp", {}, "densenet121", "resnet34"),
    "ehformer": ("ehformer", {"stage": 1}, "mit_b5", "resnet34"),
}
# networks whose heads are one foreground map (the others are built with 2 classes)
BINARY_ONLY = {"acsnet", "caranet", "ehformer"}


def _renamed(key: str, rename: tuple[tuple[str, str], ...]) -> str:
    return next((new + key[len(old):] for old, new in rename if key.startswith(old)), key)


def _one_line(error: pytest.ExceptionInfo, *names: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.mark.parametrize("case", CASES)
def test_encoder_file_loads_into_a_one_channel_network_with_the_first_conv_adapted(files, case):
    name, options, good, _ = CASES[case]
    classes = 1 if name in BINARY_ONLY else 2
    model = medseg.create_model(name, 1, classes, encoder_weights=str(files[good]), **options).eval()
    card = model.card.encoder
    state = {_renamed(k, card.rename): v for k, v in read_state_dict(files[good]).items()}
    encoder = model.get_submodule(card.module).state_dict()
    for key, tensor in encoder.items():
        expected = adapt_input_conv(1, state[key]) if key == card.first_conv else state[key]
        assert torch.equal(tensor, expected), key
    assert encoder[card.first_conv].shape[1] == 1 and state[card.first_conv].shape[1] == 3
    (report,) = model.load_reports
    assert report.loaded == len(encoder) and report.adapted == {card.first_conv: "3->1 channels"}
    assert report.what == card.label and report.file == str(files[good])
    assert len(report.unused) == len(state) - len(encoder)
    assert f"into {card.label} (first conv adapted 3->1 channels" in report.summary()
    assert model.spec.options["encoder_weights"] == str(files[good])
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, classes, 64, 64)


@pytest.mark.parametrize("case", CASES)
def test_partial_and_wrong_encoder_files_are_refused_in_one_line(files, case, tmp_path):
    name, options, good, wrong = CASES[case]
    classes = 1 if name in BINARY_ONLY else 2
    model = medseg.create_model(name, 1, classes, **options)
    card, used = model.card.encoder, model.get_submodule(model.card.encoder.module).state_dict()
    state = read_state_dict(files[good])
    # a tensor the encoder takes (a layout may leave some of the file's blocks unused)
    dropped = [k for k in state if k.endswith(".weight") and k != card.first_conv
               and _renamed(k, card.rename) in used][len(state) // 20]
    partial = tmp_path / f"partial_{good}.pth"
    torch.save({k: v for k, v in state.items() if k != dropped}, partial)
    with pytest.raises(MedsegError) as error:
        medseg.create_model(name, 1, classes, encoder_weights=str(partial), **options)
    message = _one_line(error, str(partial), card.label, repr(_renamed(dropped, card.rename)), "absent in the file")
    assert "1 of" in message
    with pytest.raises(MedsegError) as error:
        medseg.create_model(name, 1, classes, encoder_weights=str(files[wrong]), **options)
    _one_line(error, str(files[wrong]), card.label, "first '", " in the file, ", " needs (")


def test_a_swapped_encoder_takes_the_smp_slot_of_its_option():
    options = {"encoder": "mobilenet_v2", "nhsic": False}
    assert medseg.create_model("fovea_unet", 1, 1, **options).card.encoder.first_conv == "features.0.0.weight"
    assert medseg.create_model("fovea_unet", 1, 1).card.encoder.module == "encoder"
    assert medseg.create_model("stsnet", 1, 2, encoder="efficientnet-b0").card.encoder.first_conv == "_conv_stem.weight"
    dpn = medseg.create_model("stsnet", 1, 2, encoder="dpn68")
    assert dpn.card.encoder.first_conv in dpn.network.encoder.state_dict()


def test_encoder_weights_is_an_option_exactly_of_networks_with_an_encoder_slot():
    assert "encoder_weights" in medseg.models.model_info("m2snet").options()
    assert "encoder_weights" not in medseg.models.model_info("unet").options()
    with pytest.raises(MedsegError, match="no option encoder_weights"):
        medseg.create_model("unet", 1, 1, encoder_weights="x.pth")
    model = medseg.create_model("fovea_unet", 1, 1, encoder_weights=None)
    assert model.load_reports == [] and model.spec.options == {"encoder_weights": None}


def test_the_rule_on_a_small_module(tmp_path):
    source = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))
    state = {f"body.{k}": v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pth")
    target = nn.Sequential(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 5, 1))
    target[1].num_batches_tracked.fill_(7)
    head = target[2].weight.detach().clone()
    report = load_weights(target, tmp_path / "ddp.pth", what="a test net", first_conv="0.weight",
                          rename=(("body.", ""),), reinit=("2",))
    assert isinstance(report, LoadReport)
    assert torch.equal(target[0].weight, adapt_input_conv(4, source[0].weight.detach()))  # repeat and scale by 3/4
    assert torch.equal(target[1].running_var, source[1].running_var) and target[1].num_batches_tracked == 7
    assert torch.equal(target[2].weight, head)
    assert report.to_dict() == {"file": str(tmp_path / "ddp.pth"), "what": "a test net", "loaded": 6,
                                "missing_buffers": ["1.num_batches_tracked"], "reinitialised": ["2.weight", "2.bias"],
                                "unused": ["body.2.weight", "body.2.bias"], "adapted": {"0.weight": "3->4 channels"}}
    assert report.summary() == (f"loaded 6 tensors from {tmp_path / 'ddp.pth'} into a test net (first conv adapted "
                                "3->4 channels; 2 re-initialised: 2.weight, 2.bias; 1 absent num_batches_tracked kept; "
                                "2 unused)")
    with pytest.raises(MedsegError) as error:  # without reinit the other head is a mismatch
        load_weights(target, tmp_path / "ddp.pth", what="a test net", first_conv="0.weight", rename=(("body.", ""),))
    _one_line(error, str(tmp_path / "ddp.pth"), "'2.weight': of shape (2, 8, 1, 1) in the file, a test net needs "
                                                 "(5, 8, 1, 1)")
    with pytest.raises(MedsegError) as error:  # without first_conv the 3-channel kernel is a mismatch
        load_weights(target, tmp_path / "ddp.pth", what="a test net", rename=(("body.", ""),), reinit=("2",))
    _one_line(error, "'0.weight': of shape (8, 3, 3, 3)")


def test_lossnet_vgg_file_goes_through_the_same_rule(tmp_path):
    features = torchvision.models.vgg16(weights=None).features
    whole = {f"features.{k}": v for k, v in features.state_dict().items()}  # the whole model's layout
    torch.save(whole, tmp_path / "vgg16.pth")
    lossnet = create_loss("lossnet", vgg_weights=str(tmp_path / "vgg16.pth"))
    assert all(torch.equal(v, whole[f"features.{k}"]) for k, v in lossnet.vgg.state_dict().items())
    assert lossnet.load_report.loaded == 20 and lossnet.load_report.unused == [f"features.{i}.{p}" for i in (24, 26, 28)
                                                                             for p in ("weight", "bias")]
    truncated = {k: v for k, v in whole.items() if int(k.split(".")[1]) < 16}  # only up to relu3_3
    torch.save(truncated, tmp_path / "vgg16_truncated.pth")
    with pytest.raises(MedsegError) as error:
        create_loss("lossnet", vgg_weights=str(tmp_path / "vgg16_truncated.pth"))
    _one_line(error, str(tmp_path / "vgg16_truncated.pth"), "torchvision vgg16", "'17.weight': absent", "6 of 20")


def test_whole_network_file_reinitialises_only_the_head_and_adapts_the_first_conv(tmp_path):
    source = medseg.create_model("fovea_unet", 3, 1, decoder_widths=(16, 16, 8, 8))
    save_model(source, tmp_path / "source")
    target = medseg.create_model("fovea_unet", 1, 2, decoder_widths=(16, 16, 8, 8))
    head = {k: v.clone() for k, v in target.head.state_dict().items()}
    report = load_network_weights(target, tmp_path / "source" / "model.safetensors")
    assert report.reinitialised == ["head.weight", "head.bias"] and set(report.unused) == {"head.weight", "head.bias"}
    assert report.adapted == {"encoder.stem.0.weight": "3->1 channels"}
    kept, own = source.state_dict(), target.state_dict()
    for key, tensor in own.items():
        if key.startswith("head."):
            assert torch.equal(tensor, head[key.removeprefix("head.")])
        elif key == "encoder.stem.0.weight":
            assert torch.equal(tensor, adapt_input_conv(1, kept[key]))
        else:
            assert torch.equal(tensor, kept[key]), key
    assert target.load_reports == [report]
    dropped = next(k for k in kept if k.startswith("decoder.1.") and k.endswith(".weight"))
    partial = {k: v for k, v in kept.items() if k != dropped}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(MedsegError) as error:
        load_network_weights(target, tmp_path / "partial.safetensors")
    _one_line(error, str(tmp_path / "partial.safetensors"), "network fovea_unet", repr(dropped), "1 of")


def test_unreadable_files_are_user_errors(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MedsegError, match="cannot read weights file"):
        read_state_dict(tmp_path / "junk.safetensors")
    model = medseg.create_model("m2snet", 1, 1)
    with pytest.raises(MedsegError, match="does not exist"):
        load_encoder_weights(model, tmp_path / "missing.pth")


def test_a_run_prints_and_stores_what_its_weights_file_loaded(phantom, tmp_path, capsys):
    import yaml

    from medseg.config import load_recipe
    from medseg.engine.train import train

    source = save_model(medseg.create_model("unet", 3, 2, base_channels=4), tmp_path / "source")
    tiny = ["model.base_channels=4", "data.size=64", "train.batch_size=4", "data.num_workers=0", "train.epochs=1",
            f"model.weights={source / 'model.safetensors'}"]
    run = train(load_recipe("unet", tiny), phantom, out=tmp_path / "runs", progress=False)
    stored = yaml.safe_load(run.config_file.read_text())["run"]["weights"]
    assert len(stored) == 1 and stored[0]["file"].endswith("model.safetensors")
    assert sorted(stored[0]["reinitialised"]) == ["head.bias", "head.weight"]  # 2 classes in the file, 1 here
    assert f"from {source / 'model.safetensors'}" in capsys.readouterr().out
    # the run's own Lightning checkpoint initialises a network too (its tensors sit under "model.")
    again = medseg.create_model("unet", 3, 1, base_channels=4)
    report = load_network_weights(again, run.last_checkpoint)
    assert report.loaded == len(again.state_dict()) and not report.reinitialised
    trained = medseg.load_model(run.path)  # exported from best.ckpt, which may be an earlier epoch
    assert set(again.state_dict()) == set(trained.state_dict())


def test_random_init_where_the_paper_is_pretrained_is_warned_and_a_random_backbone_is_not_frozen():
    from medseg.config import load_recipe
    from medseg.engine.module import SegmentationModule
    from medseg.engine.train import initialisation_notes

    recipe = load_recipe("fovea_unet", ["model.decoder_widths=[16,16,8,8]"])
    trained, notes = initialisation_notes(recipe, SegmentationModule(recipe.to_dict()))
    assert notes[0].startswith("fovea_unet starts from random weights, the paper from an ImageNet GhostNet backbone")
    assert notes[1].startswith("train.freeze skipped: encoder would be frozen at random init for 30 epochs")
    assert trained.train.freeze is None and recipe.train.freeze is not None  # the recipe given is left alone
    assert trained.schedule == recipe.schedule  # the lr still drops to 1e-5 after epoch 30, as the paper's does
    unet = load_recipe("unet", ["model.base_channels=4"])  # its paper trains from scratch: nothing to say
    assert initialisation_notes(unet, SegmentationModule(unet.to_dict())) == (unet, [])


def test_every_slot_weights_list_names_has_a_loading_test():
    from medseg.engine.weight_files import weight_slots

    tested = {medseg.create_model(name, 1, 1 if name in BINARY_ONLY else 2, **options).card.encoder.label
              for name, options, _, _ in CASES.values()}
    listed = {slot.card.label for slot in weight_slots() if slot.used_by != ("lossnet",)}
    assert listed == tested


def test_weights_list_gives_the_line_that_saves_each_file():
    result = run_cli("weights", "list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert ("timm res2net50d: attention_unet_res2net50, bcsnet, infnet, m2snet, msnet, pranet, unet_res2net50, "
            "unetpp_res2net50  (model.encoder_weights)") in out
    assert "torchvision resnet34: acsnet, umnet  (model.encoder_weights)" in out
    assert "timm.create_model('res2net50d', pretrained=True).state_dict(), 'res2net50d.pth')" in out
    assert "smp dpn68: deeplabv3_stsnet, stsnet encoder=dpn68" in out
    assert "get_encoder('dpn68', weights='imagenet')" in out
    assert "torchvision vgg16: lossnet  (loss.N.vgg_weights" in out and "vgg16(weights='IMAGENET1K_V1')" in out


def test_weights_inspect_reports_what_a_file_fits(files, tmp_path):
    import json

    result = run_cli("weights", "inspect", str(files["res2net50d"]), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert f"{files['res2net50d']}: state dict, 524 tensors" in result.stdout
    assert ("full match: timm res2net50d (522 tensors; 2 of the file's unused) -> attention_unet_res2net50, bcsnet, "
            "infnet, m2snet, msnet, pranet, unet_res2net50, unetpp_res2net50 with model.encoder_weights"
            ) in " ".join(result.stdout.split())
    report = json.loads((tmp_path / "r.json").read_text())
    assert [m["slot"] for m in report["matches"] if m["status"] == "full"] == ["timm res2net50d"]
    assert report["prefixes"]["layer1"] == 96 and report["format"] == "state dict"
    # a file that loading refuses is reported with its closest slot and the first offending tensor
    from medseg.engine.weight_files import inspect_file

    state = read_state_dict(files["res2net50d"])
    state.pop("layer4.2.bn3.weight")
    torch.save(state, tmp_path / "partial.pth")
    closest = max(inspect_file(tmp_path / "partial.pth")["matches"], key=lambda m: m["matched"] / m["needed"])
    assert (closest["slot"], closest["status"], closest["matched"], closest["needed"]) == ("timm res2net50d", "partial",
                                                                                           521, 522)
    assert closest["first_problem"] == "layer4.2.bn3.weight: absent in the file, needs (2048,)"
    # a model folder's weights are matched against the network its config.json names
    folder = save_model(medseg.create_model("unet", 1, 2, base_channels=4), tmp_path / "unet")
    saved = inspect_file(folder / "model.safetensors")["matches"][-1]
    assert saved["slot"] == f"network unet (from {folder})" and saved["status"] == "full"
    with pytest.raises(MedsegError, match="does not exist"):
        inspect_file(tmp_path / "nope.pth")
