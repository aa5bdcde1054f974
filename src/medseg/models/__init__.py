"""Networks: the registry, shared blocks, one file per family. Importing this package registers them all."""

from medseg.models import (  # noqa: F401  (registers the networks)
    acsnet,
    afma,
    bcsnet,
    caranet,
    centroidnet,
    deeplab,
    denseaspp,
    doubleunet,
    ehformer,
    enet,
    fcn,
    focusnet,
    fovea_unet,
    i2unet,
    infnet,
    lednet,
    m2snet,
    nested,
    nunet,
    pranet,
    res2net_unets,
    resunetpp,
    segnet,
    skunet,
    stsnet,
    transunet,
    triple_unet,
    umnet,
    unet,
    unet_variants,
    utnet,
)
from medseg.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from medseg.models.saving import load_model, save_model

__all__ = ["ModelInfo", "create_model", "list_models", "load_model", "model_info", "register_model", "save_model"]
