"""medseg: 2D medical image segmentation, five published papers and their baselines, side by side.

Public API: `create_model`, `list_models`, `load_model`.
"""

from medseg.models import create_model, list_models, load_model

__version__ = "0.1.0"
__all__ = ["__version__", "create_model", "list_models", "load_model"]
