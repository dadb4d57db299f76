"""Every recipe the project ships validates (from the repository root, as the README runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.plan.catalog import recipe_files
from lora_tune.recipe.load import load_recipe, read_yaml

ROOT = Path(__file__).resolve().parents[1]
# recipe_files skips recipes/data (data), base/ (parts that recipes extend) and accelerate/ (launcher configs).
RECIPES = recipe_files(ROOT / "recipes")


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe.output_dir.startswith("runs/")


def test_every_base_part_is_extended_by_a_recipe():
    """base/ parts are validated through the recipes that extend them, so each must have one."""
    extended = set()
    for path in RECIPES:
        parent = read_yaml(path).data.get("extends")
        if parent:
            extended.add((path.parent / parent).resolve())
    bases = sorted((ROOT / "recipes" / "base").glob("*.yaml"))
    assert bases and all(base.resolve() in extended for base in bases)
