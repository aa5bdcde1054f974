"""STS-Net: parameter count, ESCA, in-line attention, the ablation families."""

import pytest
import torch
import torch.nn.functional as F

import medseg
from medseg.errors import MedsegError
from medseg.models.stsnet import ESCA, eca_kernel_size


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_matches_the_paper():
    assert n_params(medseg.create_model("stsnet", 3, 2)) == 39_105_873
    assert n_params(medseg.create_model("deeplabv3", 3, 2)) == 39_105_858  # the same without the 5 x 3 ESCA weights


def test_adaptive_kernel_follows_the_eca_rule():
    assert [eca_kernel_size(c) for c in (64, 256, 512, 1024, 2048)] == [3, 5, 5, 5, 7]
    model = medseg.create_model("stsnet", 3, 2, adaptive_k=True)
    assert [m.conv.kernel_size[0] for m in model.attention] == [3, 5, 5, 5, 7]


def test_esca_is_one_shared_kernel_applied_twice():
    torch.manual_seed(0)
    esca = ESCA(16)
    x = torch.randn(2, 16, 5, 7)
    weight = esca.conv.weight  # (1, 1, 3): the only parameter
    assert [p.numel() for p in esca.parameters()] == [3]
    y = x.mean(dim=(2, 3)).unsqueeze(1)
    y = F.conv1d(F.conv1d(y, weight, padding=1), weight, padding=1)
    assert torch.allclose(esca(x), x * torch.sigmoid(y).transpose(1, 2).unsqueeze(-1), atol=1e-6)


def test_attention_is_in_line_the_next_stage_sees_the_reweighted_tensor():
    attended = medseg.create_model("stsnet", 3, 2).eval()
    plain = medseg.create_model("deeplabv3", 3, 2).eval()
    plain.network.load_state_dict(attended.network.state_dict())
    for esca in attended.attention:
        torch.nn.init.zeros_(esca.conv.weight)  # sigmoid(0) = 1/2: every stage output is halved
    encoder = plain.network.encoder
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = attended.network.encoder(x)
        stage1 = 0.5 * encoder.relu(encoder.bn1(encoder.conv1(x)))
        stage2 = 0.5 * encoder.layer1(encoder.maxpool(stage1))
    assert torch.allclose(features[1], stage1, atol=1e-5)
    assert torch.allclose(features[2], stage2, atol=1e-5)


@pytest.mark.parametrize("encoder", ["resnet50", "mobilenet_v2", "efficientnet-b0", "dpn68"])
def test_every_encoder_takes_attention_at_its_five_stages(encoder):
    model = medseg.create_model("stsnet", 3, 2, encoder=encoder, attention="esca").eval()
    calls = []
    for esca in model.attention:
        esca.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[1]))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    assert calls == list(model.network.encoder.out_channels[1:])


@pytest.mark.parametrize("attention,extra", [("se", 701_481), ("cbam", 697_317), ("eca", 10), ("none", -15)])
def test_attention_variants_replace_esca_at_the_same_places(attention, extra):
    model = medseg.create_model("stsnet", 3, 2, attention=attention).eval()
    assert n_params(model) == 39_105_873 + extra
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_decoder_family_and_errors():
    counts = {"deeplabv3plus": 26_149_714, "unet": 31_993_122, "pan": 23_731_977, "fpn": 25_588_034}  # smp, 2 classes
    for decoder, expected in counts.items():
        model = medseg.create_model("stsnet", 3, 2, decoder=decoder, attention="none")
        assert n_params(model) == expected, decoder
    with pytest.raises(ValueError, match="PAN decoder needs inputs of at least 128"):
        medseg.create_model("pan", 3, 2)(torch.randn(1, 3, 64, 64))
    with pytest.raises(MedsegError, match="unknown encoder 'vgg11'"):
        medseg.create_model("stsnet", 3, 2, encoder="vgg11")


def test_benchmark_model_specs_reach_the_ablation_options():
    from medseg.engine.benchmark import benchmark_model, parse_model_spec

    assert (parse_model_spec("stsnet:decoder=unet:adaptive_k=true")
            == ("stsnet", {"decoder": "unet", "adaptive_k": True}))
    with pytest.raises(MedsegError, match="key=value"):
        parse_model_spec("stsnet:unet")
    row = benchmark_model("stsnet:attention=none", (32, 32), batch=1, device="cpu", warmup=0, repeats=1, num_classes=2)
    assert row["model"] == "stsnet:attention=none" and row["params"] == 39_105_858
