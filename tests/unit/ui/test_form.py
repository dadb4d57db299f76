"""The recipe form is the schema: every key a resolved recipe holds has a field, with the schema's default and help
text; validation gives the same line as `lora-tune validate`, at the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_tune.cli import main
from lora_tune.recipe.load import dump_resolved, load_recipe
from lora_tune.recipe.schema import AdapterConfig, TrainingConfig
from lora_tune.ui import form

ROOT = Path(__file__).resolve().parents[3]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the quickstart's data paths are relative to the working directory


def resolved_keys(data: dict, prefix: str = "") -> set[str]:
    """The section.key paths of a resolved recipe (one level into each section, as the form has them)."""
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict) and not prefix:
            keys |= {f"{name}.{sub}" for sub in value}
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_every_key_of_a_resolved_recipe_has_a_field_with_the_resolved_default() -> None:
    fields = form.all_fields()
    resolved = yaml.safe_load(dump_resolved(load_recipe(QUICKSTART)))
    written = form.parse(QUICKSTART.read_text())
    assert resolved_keys(resolved) - set(fields) == set()
    for key in resolved_keys(resolved):
        present, _ = form.get_value(written, key)
        if not present and not fields[key].required:  # not in the file: the schema's default is what resolves
            assert fields[key].default == form.get_value(resolved, key)[1], key


def test_help_text_and_choices_are_the_schemas() -> None:
    fields = form.all_fields()
    assert fields["training.learning_rate"].help == TrainingConfig.model_fields["learning_rate"].description
    assert fields["adapter.r"].help == AdapterConfig.model_fields["r"].description
    assert fields["training.learning_rate"].kind == "float"
    assert fields["training.max_steps"].kind == "int" and fields["training.max_steps"].default is None
    assert fields["training.packing"].kind == "bool"
    assert fields["training.lr_scheduler"].kind == "choice" and "cosine" in fields["training.lr_scheduler"].choices
    assert fields["quantization.bits"].choices == (4, 8)
    assert fields["adapter.target_modules"].kind == "yaml"  # a list or a string
    assert fields["datasets"].kind == "yaml" and fields["datasets"].required
    assert fields["output_dir"].required and fields["output_dir"].kind == "text"


def test_values_set_and_removed_by_key() -> None:
    data = {"model": {"name": "m"}}
    form.set_value(data, "training.max_steps", 5)
    assert data["training"] == {"max_steps": 5} and form.get_value(data, "training.max_steps") == (True, 5)
    form.remove_value(data, "training.max_steps")
    assert "training" not in data and form.get_value(data, "training.max_steps") == (False, None)
    form.remove_value(data, "adapter.r")  # absent: nothing happens
    assert data == {"model": {"name": "m"}}


def test_widget_values_become_recipe_values() -> None:
    fields = form.all_fields()
    assert form.from_widget(fields["training.max_steps"], 40.0) == 40
    assert isinstance(form.from_widget(fields["training.max_steps"], 40.0), int)
    assert form.from_widget(fields["adapter.target_modules"], "[q_proj, v_proj]") == ["q_proj", "v_proj"]
    assert form.to_widget(fields["adapter.target_modules"], ["q_proj", "v_proj"]) == "[q_proj, v_proj]"
    assert form.from_widget(fields["model.tokenizer"], "") is None
    with pytest.raises(yaml.YAMLError):
        form.from_widget(fields["adapter.target_modules"], "[q_proj")


def test_a_bad_value_is_refused_with_the_line_validate_prints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = QUICKSTART.read_text().replace("learning_rate: 3.0e-3", "learning_rate: -1")
    recipe, error = form.validate_text(text, QUICKSTART, "recipes/quickstart.yaml")
    assert recipe is None and error.key == "training.learning_rate"
    saved = tmp_path / "quickstart.yaml"
    saved.write_text(text)
    assert main(["validate", str(saved)]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert cli_line == f"error: {error.render()}".replace("recipes/quickstart.yaml", str(saved))
    assert error.render().startswith("recipes/quickstart.yaml:")


def test_extends_resolves_against_the_recipes_own_folder(tmp_path: Path) -> None:
    child = "extends: ../quickstart.yaml\ntraining:\n  max_steps: 7\n"
    recipe, error = form.validate_text(child, ROOT / "recipes" / "methods" / "x.yaml", "x.yaml")
    assert error is None and recipe.training.max_steps == 7 and recipe.adapter.r == 8
    recipe, error = form.validate_text(child, tmp_path / "x.yaml", "x.yaml")
    assert recipe is None and error.key == "extends"
