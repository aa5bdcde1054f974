"""Losses: the registry, the recipe's weighted sum, deep supervision. Importing registers them all."""

from medseg.losses import basic, hybrid, m2snet, umnet  # noqa: F401  (registers every loss)
from medseg.losses.registry import CompositeLoss, SegmentationLoss, build_loss, create_loss, list_losses, register_loss

__all__ = ["CompositeLoss", "SegmentationLoss", "build_loss", "create_loss", "list_losses", "register_loss"]
