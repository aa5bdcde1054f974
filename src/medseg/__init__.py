"""medseg: 2D medical image segmentation, five published papers and their baselines, side by side.

Public API: `create_model`, `list_models`, `load_model`. They are imported on first use (PEP 562), so that
`import medseg.errors` — and with it `medseg --help` — does not pay for torch, timm and Lightning.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medseg")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["__version__", "create_model", "list_models", "load_model"]


def __getattr__(name: str):
    if name in ("create_model", "list_models", "load_model"):
        from medseg import models

        return getattr(models, name)
    raise AttributeError(f"module 'medseg' has no attribute {name!r}")
