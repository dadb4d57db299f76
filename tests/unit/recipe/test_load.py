"""Recipe parsing: typed defaults, extends, overrides, and one precise error per kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_tune.errors import RecipeError
from lora_tune.recipe.load import dump_resolved, load_recipe

BASE = """\
model:
  name: some/model
quantization:
  bits: 4
adapter:
  r: 8
datasets:
  - path: {data}
output_dir: runs/x
"""


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def base(tmp_path: Path, data: Path) -> Path:
    return write(tmp_path, "base.yaml", BASE.format(data=data))


def error_of(path: Path, overrides: tuple[str, ...] = ()) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value


def test_defaults_are_filled_and_typed(tmp_path, data):
    recipe = load_recipe(base(tmp_path, data))
    assert recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
    assert recipe.adapter.r == 8 and recipe.adapter.alpha == 32 and recipe.adapter.target_modules == "all-linear"
    assert recipe.training.learning_rate == pytest.approx(2e-4)
    assert recipe.model.trust_remote_code is False


def test_yaml_float_without_dot_is_a_float(tmp_path, data):
    # PyYAML reads `1e-4` as a string; the typed config must still give a float.
    path = write(tmp_path, "r.yaml", BASE.format(data=data) + "training:\n  learning_rate: 1e-4\n")
    assert load_recipe(path).training.learning_rate == pytest.approx(1e-4)


def test_extends_merges_sections_and_child_wins(tmp_path, data):
    base(tmp_path, data)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nadapter:\n  alpha: 16\noutput_dir: runs/y\n")
    recipe = load_recipe(child)
    assert (recipe.adapter.r, recipe.adapter.alpha) == (8, 16)  # r from the base, alpha from the child
    assert recipe.output_dir == "runs/y"


def test_extends_cycle_and_missing_parent(tmp_path):
    a = write(tmp_path, "a.yaml", "extends: b.yaml\n")
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    assert "cycle" in str(error_of(a))
    missing = write(tmp_path, "m.yaml", "extends: nowhere.yaml\n")
    err = error_of(missing)
    assert (err.line, err.key) == (1, "extends") and "not found" in err.message


def test_error_in_base_file_names_the_base_file(tmp_path, data):
    write(tmp_path, "base.yaml", BASE.format(data=data).replace("r: 8", "r: 0"))
    child = write(tmp_path, "child.yaml", "extends: base.yaml\n")
    err = error_of(child)
    assert err.file.endswith("base.yaml") and err.line == 6 and err.key == "adapter.r"


def test_overrides_set_nested_list_and_typed_values(tmp_path, data):
    path = base(tmp_path, data)
    recipe = load_recipe(
        path,
        [
            "training.learning_rate=1e-4",
            "output_dir=runs/z",
            "datasets.0.limit=5",
            "adapter.target_modules=[q_proj, v_proj]",
            "training.packing=true",
        ],
    )
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.output_dir == "runs/z" and recipe.datasets[0].limit == 5
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"] and recipe.training.packing is True


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("training.learning_rat=1", "training.learning_rat", "did you mean 'learning_rate'"),
        ("adapter.r=abc", "adapter.r", "valid integer"),
        ("datasets.4.path=x.jsonl", "datasets.4", "list index below 1"),
        ("training.learning_rate", None, "KEY=VALUE"),
    ],
)
def test_override_errors_name_the_command_line(tmp_path, data, override, key, fragment):
    err = error_of(base(tmp_path, data), (override,))
    assert err.file == "command line" and err.key == key and fragment in err.message


@pytest.mark.parametrize(
    ("extra", "line", "key", "fragment"),
    [
        # unknown key with a suggestion, at the line of the key
        ("training:\n  learing_rate: 0.1\n", 11, "training.learing_rate", "did you mean 'learning_rate'"),
        # another tool's spelling gets our spelling
        ("training:\n  max_seq_length: 512\n", 11, "training.max_seq_length", "training.max_length"),
        # wrong type
        ("training:\n  batch_size: many\n", 11, "training.batch_size", "valid integer"),
        # out of range
        ("training:\n  learning_rate: -1\n", 11, "training.learning_rate", "greater than 0"),
        ("adapter2: {}\n", 10, "adapter2", "did you mean 'adapter'"),
        # value outside a closed set
        ("training:\n  lr_scheduler: wavy\n", 11, "training.lr_scheduler", "'cosine'"),
        # contradictions
        ("training:\n  packing: true\n  max_length: null\n", 11, "training.packing", "needs max_length"),
        ("training:\n  eval_strategy: steps\n", 11, "training.eval_strategy", "no validation data"),
    ],
)
def test_each_error_class_names_file_line_and_key(tmp_path, data, extra, line, key, fragment):
    err = error_of(write(tmp_path, "r.yaml", BASE.format(data=data) + extra))
    assert err.file.endswith("r.yaml")
    assert (err.line, err.key) == (line, key)
    assert fragment in err.message
    assert str(err).startswith(f"{err.file}:{line}: {key}:")


def test_four_bit_options_with_eight_bits_is_a_contradiction(tmp_path, data):
    text = BASE.format(data=data).replace("bits: 4", "bits: 8\n  quant_type: fp4")
    err = error_of(write(tmp_path, "r.yaml", text))
    assert (err.line, err.key) == (5, "quantization.quant_type") and "4-bit" in err.message


@pytest.mark.parametrize("bits", ["null", "8", "4"])
def test_the_resolved_recipe_of_any_run_loads_again(tmp_path, data, bits):
    # RUN_DIR/recipe.yaml spells out every default, 4-bit options included; eval, merge and chat load it back.
    text = BASE.format(data=data).replace("bits: 4", f"bits: {bits}")
    recipe = load_recipe(write(tmp_path, "r.yaml", text))
    again = load_recipe(write(tmp_path, "resolved.yaml", dump_resolved(recipe)))
    assert again == recipe


def test_validation_data_given_twice(tmp_path, data):
    extra = f"val_size: 0.1\neval_datasets:\n  - path: {data}\n"
    err = error_of(write(tmp_path, "r.yaml", BASE.format(data=data) + extra))
    assert err.key == "val_size" and "either eval_datasets or val_size" in err.message


def test_missing_required_key_names_it(tmp_path, data):
    text = BASE.format(data=data).replace("output_dir: runs/x\n", "")
    err = error_of(write(tmp_path, "r.yaml", text))
    assert err.key == "output_dir" and "missing" in err.message


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    err = error_of(write(tmp_path, "r.yaml", "model:\n  name: [unclosed\nadapter: {}\n"))
    assert err.line is not None and "column" in err.message and "YAML" in err.message


def test_missing_local_data_file(tmp_path, data):
    err = error_of(write(tmp_path, "r.yaml", BASE.format(data=tmp_path / "nope.jsonl")))
    assert (err.line, err.key) == (8, "datasets.0.path") and "not found" in err.message


def test_empty_and_non_mapping_recipes(tmp_path):
    assert "empty" in error_of(write(tmp_path, "e.yaml", "")).message
    assert "mapping" in error_of(write(tmp_path, "l.yaml", "- a\n- b\n")).message
    assert "not found" in error_of(tmp_path / "absent.yaml").message


def test_resolved_recipe_round_trips(tmp_path, data):
    recipe = load_recipe(base(tmp_path, data), ["training.max_steps=7"])
    resolved = write(tmp_path, "resolved.yaml", dump_resolved(recipe))
    assert load_recipe(resolved) == recipe
    assert yaml.safe_load(resolved.read_text())["training"]["warmup_steps"] == recipe.training.warmup_steps


def test_yaml_1_2_scalars_no_is_a_string(tmp_path, data):
    # YAML 1.1 (PyYAML's default) reads `no` as False; recipes follow YAML 1.2, where only true/false are booleans.
    text = BASE.format(data=data) + "training:\n  eval_strategy: no\n  save_strategy: no\n  packing: true\n"
    recipe = load_recipe(write(tmp_path, "r.yaml", text))
    assert recipe.training.eval_strategy == "no" and recipe.training.save_strategy == "no"
    assert recipe.training.packing is True
    assert load_recipe(tmp_path / "r.yaml", ["training.save_strategy=no"]).training.save_strategy == "no"
