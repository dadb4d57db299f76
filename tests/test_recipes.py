"""Every recipe the project ships validates (from the repository root, as the README runs them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
NOT_RECIPES = {"data", "accelerate"}  # data files; accelerate launcher configs (tests/unit/test_distributed.py)
RECIPES = sorted(
    p for p in (ROOT / "recipes").rglob("*.yaml") if not NOT_RECIPES & set(p.relative_to(ROOT / "recipes").parts)
)


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_validates(path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path)
    assert recipe.output_dir.startswith("runs/")
