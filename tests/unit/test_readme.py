"""The README's recipe table is generated from the typed config; it must not drift."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_recipe_reference_in_readme_is_current():
    spec = importlib.util.spec_from_file_location("recipe_reference", ROOT / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert module.embed(readme) == readme, "run: python scripts/recipe_reference.py --write"
    assert "`training.learning_rate`" in readme
