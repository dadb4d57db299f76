"""The recipe reference table (docs/recipes.md) is generated from the typed config; it must not drift."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("recipe_reference", ROOT / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_reference_in_docs_is_current():
    module = load_script()
    assert module.TARGET == ROOT / "docs" / "recipes.md"  # `--write` refreshes the page the test reads
    page = module.TARGET.read_text(encoding="utf-8")
    assert page.count(module.START) == 1 and page.count(module.END) == 1
    assert module.embed(page) == page, "run: python scripts/recipe_reference.py --write"
    assert "`training.learning_rate`" in page


def test_readme_stays_short_and_points_to_the_reference():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) < 10240, "README.md is the first screen; move detail into docs/"
    assert "recipe-reference:start" not in readme  # the table lives in docs/recipes.md only
    assert "(docs/recipes.md)" in readme
