"""`medseg analyze cka` on any network: the layer a network names by default, or one the user gives, checked
against the network's modules with an error that lists real layer names."""

import pytest
import torch

from medseg.engine.analyze import choose_layer, conv_layers
from medseg.errors import MedsegError
from medseg.models import create_model


def test_a_network_that_names_no_layer_needs_one_and_hears_its_conv_layers():
    model = create_model("unet", 3, 1, base_channels=4)
    convs = conv_layers(model)
    kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    assert convs and all(isinstance(model.get_submodule(name), kinds) for name in convs)
    with pytest.raises(MedsegError, match=rf"names no default layer.*--layer.*its {len(convs)} conv layers, "
                                          rf"e\.g\. {convs[0]}, {convs[1]}, {convs[2]}, .*{convs[-1]}$"):
        choose_layer(model, "unet", None)
    assert choose_layer(model, "unet", convs[4]) == convs[4]
    assert choose_layer(model, "unet", "encoder.1") == "encoder.1"  # any module with (C, H, W) outputs
    for wrong in ("decoder.nope", ""):
        with pytest.raises(MedsegError, match=rf"'{wrong}' is not in the network 'unet'; try one of its"):
            choose_layer(model, "unet", wrong)


def test_a_network_that_names_layers_defaults_to_the_first():
    model = create_model("fovea_unet", 3, 1, decoder_widths=[16, 16, 16, 16])
    assert choose_layer(model, "fovea_unet", None) == "encoder.stages.0.0.ghost1.primary_conv"
    with pytest.raises(MedsegError, match="try one of the layers it names: encoder.stages.0.0.ghost1.primary_conv, "):
        choose_layer(model, "fovea_unet", "stem")
    swapped = create_model("fovea_unet", 3, 1, encoder="mobilenet_v2", nhsic=False, decoder_widths=[16, 16, 16, 16])
    with pytest.raises(MedsegError, match="'fovea_unet' names no default layer.*conv layers, e.g. encoder.body"):
        choose_layer(swapped, "fovea_unet", None)
