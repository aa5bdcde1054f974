"""The registry's table as data: `medseg models` reads `catalogue.json` instead of building every network.

Building all fourteen networks to count their parameters takes seconds and needs torch; the table they give only
changes when a network or its card changes. `python -m medseg.models.catalogue` rewrites the file, and
tests/test_models.py fails when it is out of date, so the shipped table is always the registry's.
"""

from __future__ import annotations

import json
from pathlib import Path

CATALOGUE = Path(__file__).with_name("catalogue.json")


def catalogue_rows() -> list[dict]:
    """One row per registered network: paper, parameters with 3 input channels and its paper's head, sizes,
    the built-in recipe of the same name (None without one)."""
    from medseg.config import list_recipes
    from medseg.models import create_model, list_models, model_info

    recipes = set(list_recipes())
    rows = []
    for name in list_models():
        info = model_info(name)
        network = create_model(name, 3, info.paper_num_classes)
        rows.append({"name": name, "paper": info.paper, "params": sum(p.numel() for p in network.parameters()),
                     "in_channels": 3, "out_channels": info.paper_num_classes,
                     "default_size": info.default_size, "size_multiple": info.size_multiple,
                     "recipe": name if name in recipes else None})
    return rows


def render(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1) + "\n"


if __name__ == "__main__":
    CATALOGUE.write_text(render(catalogue_rows()))
    print(f"wrote {CATALOGUE}")
