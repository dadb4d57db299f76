"""Where the recipe catalog lives: the one piece of the catalog that the planner needs too (for the model configs it
ships), kept apart so that `catalog` -> `plan` -> `model_shape` does not lead back to `catalog`."""

from __future__ import annotations

import os
from pathlib import Path

from lora_tune.errors import LoraTuneError

CATALOG_ENV = "LORA_TUNE_RECIPES"


class CatalogError(LoraTuneError):
    """A catalog lookup failed: the name is unknown or ambiguous, or there is no catalog folder."""


def catalog_dir(explicit: str | Path | None = None) -> Path:
    """The catalog folder: `explicit`, else $LORA_TUNE_RECIPES, else ./recipes, else the source checkout's."""
    candidates = [explicit, os.environ.get(CATALOG_ENV), Path("recipes")]
    candidates.append(Path(__file__).resolve().parents[2] / "recipes")  # an editable install's checkout
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise CatalogError(
        f"no recipe catalog found (looked in ./recipes and the lora-tune checkout); pass --dir or set {CATALOG_ENV}"
    )


def catalog_dir_if_any(explicit: str | Path | None = None) -> Path | None:
    """`catalog_dir`, or None where there is no catalog: for what works without one (`new` sizes a model from a local
    config.json or the size in its name)."""
    try:
        return catalog_dir(explicit)
    except CatalogError:
        return None
