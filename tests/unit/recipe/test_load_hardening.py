"""Hostile or absurd recipes: each is refused through the CLI with exit 2 and one short line naming file and line.

Infinite and NaN floats, an alias bomb, error lines that echo megabytes, bytes that are not UTF-8, nesting 5,000
deep, `extends:` into a symlink loop or a directory, a key given twice, a null where a value is needed.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from lora_tune.cli import main
from lora_tune.recipe.schema import Recipe

RECIPE = "model:\n  name: some/model\ndatasets:\n  - path: {data}\noutput_dir: runs/x\n"  # 5 lines


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    return path


@pytest.fixture
def recipe(tmp_path: Path, data: Path) -> Path:
    return write(tmp_path / "r.yaml", RECIPE.format(data=data))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def validate(capsys: pytest.CaptureFixture[str], recipe: Path, *overrides: str) -> tuple[int, str]:
    """Exit code and stderr of `lora-tune validate`; the error must be one line."""
    code = main(["validate", str(recipe), *overrides])
    err = capsys.readouterr().err
    assert code == 0 or (err.count("\n") == 1 and err.startswith("error: ")), err[:2000]
    return code, err.strip()


# --- 6. every float finite, and in range ------------------------------------------------------------------------


def float_fields(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str]]:
    """(override key, a non-finite value of the field's shape) for every float field of the recipe, at any depth."""
    out = []
    for name, info in model.model_fields.items():
        annotation, key = info.annotation, f"{prefix}{name}"
        section = next((t for t in _members(annotation) if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if section is not None:
            out += float_fields(section, f"{key}.0." if typing.get_origin(annotation) is list else f"{key}.")
        elif float in _members(annotation):
            shape = next(
                (typing.get_origin(t) for t in _members(annotation) if typing.get_origin(t) in (list, dict)), None
            )
            out.append((key, {None: ".inf", list: "[1, .inf]", dict: "{x: .inf}"}[shape]))
    return out


def _members(annotation: typing.Any) -> list[typing.Any]:
    args = typing.get_args(annotation)
    return [annotation, *(m for arg in args for m in _members(arg))]


FLOAT_FIELDS = float_fields()


def test_the_float_field_walk_finds_the_hyper_parameters():
    keys = {key for key, _ in FLOAT_FIELDS}
    assert {"training.learning_rate", "adapter.alpha", "adapter.dropout", "training.num_epochs"} <= keys
    assert {"data.split", "adapter.alpha_pattern", "datasets.0.weight", "val_size"} <= keys


@pytest.mark.parametrize(("key", "value"), FLOAT_FIELDS, ids=[key for key, _ in FLOAT_FIELDS])
def test_every_float_field_refuses_infinity(capsys, tmp_path, data, key, value):
    # Every list of sections (and of rewards) has an item, so `eval_datasets.0.weight=.inf` reaches a float field.
    text = RECIPE.format(data=data) + f"eval_datasets:\n  - path: {data}\ntest_datasets:\n  - path: {data}\n"
    text += "rl:\n  rewards:\n    - name: answer\n"  # refused for sft, but only after each field's own check
    code, err = validate(capsys, write(tmp_path / "r.yaml", text), f"{key}={value}")
    assert code == 2, err
    assert err.startswith(f"error: command line: {key}") and "expected a finite number; got inf" in err


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.learning_rate=.inf", "expected a finite number; got inf"),
        ("training.learning_rate=.nan", "expected a finite number; got nan"),
        ("adapter.alpha=.inf", "expected a finite number; got inf"),
        ("adapter.alpha=-.inf", "expected a finite number; got -inf"),
        ("adapter.dropout=.nan", "expected a finite number; got nan"),
        ("training.num_epochs=1e308", "expected less than or equal to 10000; got 1e+308"),
        ("training.num_epochs=1e999", "expected a finite number; got inf"),  # YAML reads 1e999 as inf
        ("training.learning_rate=0", "expected greater than 0"),
        ("adapter.dropout=1", "expected less than 1"),
        ("training.seed=4294967296", "expected less than or equal to 4294967295"),  # numpy's limit: a crash later
        ("training.seed=-1", "expected greater than or equal to 0"),
        ("training.max_steps=1e308", "Unable to parse input string as an integer, exceeded maximum size"),
        ("training.max_steps=10000000000", "expected less than or equal to 1000000000"),
        ("datasets.0.weight=1e300", "expected less than or equal to 1000"),  # rows are repeated in memory
    ],
)
def test_absurd_hyper_parameters_on_the_command_line(capsys, recipe, override, fragment):
    code, err = validate(capsys, recipe, override)
    key = override.partition("=")[0]
    assert code == 2 and err.startswith(f"error: command line: {key}: {fragment}"), err


def test_infinite_alpha_in_the_file_names_its_line(capsys, tmp_path, data):
    path = write(tmp_path / "r.yaml", RECIPE.format(data=data) + "adapter:\n  alpha: .inf\n")
    assert validate(capsys, path) == (2, f"error: {path}:7: adapter.alpha: expected a finite number; got inf")


# --- 7. alias bombs and megabyte echoes ---------------------------------------------------------------------------

BOMB_LINES = 10  # each line 10 aliases of the one before: 10^10 values, a "billion laughs"


def alias_bomb(path: Path, data: Path) -> Path:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, BOMB_LINES)]
    return write(path, "\n".join(lines) + "\n" + RECIPE.format(data=data))


def limit_memory() -> None:  # in the child, before exec: a regression fails with MemoryError, not a swapping host
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path, data):
    path = alias_bomb(tmp_path / "bomb.yaml", data)
    code = f"import sys\nfrom lora_tune.cli import main\nsys.exit(main(['validate', {str(path)!r}]))\n"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=20,
            preexec_fn=limit_memory,
            env={**os.environ, "LORA_TUNE_DEBUG": "0"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("lora-tune validate still expanding the alias bomb after 20 s")
    assert proc.returncode == 2, proc.stderr[-500:]
    assert proc.stderr.startswith(f"error: {path}:2: a1.0: YAML alias '*a0' refused") and proc.stderr.count("\n") == 1


def test_a_self_referencing_alias_is_refused(capsys, tmp_path, data):
    path = write(tmp_path / "r.yaml", RECIPE.format(data=data) + "eval:\n  labels: &l [*l]\n")
    code, err = validate(capsys, path)
    assert code == 2 and err.startswith(f"error: {path}:7: eval.labels.0: YAML alias '*l' refused"), err


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("training:\n  lr_scheduler: " + "y" * 1_000_000 + "\n", "training.lr_scheduler"),
        ("training:\n  max_steps: [" + ", ".join(["1234567"] * 20_000) + "]\n", "training.max_steps"),
        ("adapter:\n  target_modules: {" + "x" * 1_000 + ": 1}\n", "adapter.target_modules"),  # a 1,025th is YAML's
    ],
    ids=["megabyte-string-for-a-closed-set", "long-list-for-a-number", "long-key-for-a-list-or-string"],
)
def test_error_lines_do_not_echo_megabytes(capsys, tmp_path, data, extra, key):
    code, err = validate(capsys, write(tmp_path / "r.yaml", RECIPE.format(data=data) + extra))
    assert code == 2 and f"{key}: expected " in err
    assert len(err) < 400 and "characters)" in err, err[:1000]


def test_a_missing_data_file_with_a_megabyte_name_is_one_short_line(capsys, tmp_path):
    path = write(tmp_path / "r.yaml", RECIPE.format(data="d" * 1_000_000 + ".jsonl"))
    code, err = validate(capsys, path)
    assert code == 2 and "datasets.0.path: file 'ddd" in err and "not found" in err and len(err) < 400, err[:500]


# --- 8. clean exit 2 instead of a raw Python error ----------------------------------------------------------------


def test_a_recipe_that_is_not_utf8(capsys, tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_bytes(RECIPE.format(data=data).encode() + b"training:\n  seed: \xff\xfe\n")
    assert validate(capsys, path) == (
        2,
        f"error: {path}:7: not UTF-8 text: byte 0xff cannot be decoded; save the recipe as UTF-8",
    )


def test_a_control_character_is_a_one_line_syntax_error(capsys, tmp_path, data):
    path = write(tmp_path / "r.yaml", RECIPE.format(data=data) + "training:\n  seed: 1\x00\n")
    code, err = validate(capsys, path)
    assert code == 2 and err.startswith(f"error: {path}:7: YAML syntax error: character #x0000"), err


def test_nesting_5000_deep_in_a_file_and_in_an_override(capsys, tmp_path, data):
    path = write(tmp_path / "r.yaml", RECIPE.format(data=data) + "eval:\n  labels: " + "[" * 5000 + "]" * 5000)
    assert validate(capsys, path) == (
        2,
        f"error: {path}:7: eval: nested more than 32 levels deep; a recipe needs a handful",
    )
    code, err = validate(capsys, write(tmp_path / "ok.yaml", RECIPE.format(data=data)), "eval.labels=" + "[" * 5000)
    assert code == 2 and err.startswith("error: command line: eval.labels.0: nested more than 32 levels"), err


def test_extends_into_a_symlink_loop(capsys, tmp_path):
    (tmp_path / "loop1.yaml").symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(tmp_path / "loop1.yaml")
    path = write(tmp_path / "r.yaml", "output_dir: runs/x\nextends: loop1.yaml\n")
    code, err = validate(capsys, path)
    assert code == 2 and err.startswith(f"error: {path}:2: extends: 'loop1.yaml' "), err
    assert "symbolic link loop" in err


def test_extends_naming_a_directory(capsys, tmp_path):
    (tmp_path / "base").mkdir()
    path = write(tmp_path / "r.yaml", "extends: base\n")
    assert validate(capsys, path) == (
        2,
        f"error: {path}:1: extends: 'base' is a directory; expected a YAML recipe file",
    )


def test_a_key_defined_twice_names_both_lines(capsys, tmp_path, data):
    text = RECIPE.format(data=data) + "training:\n  learning_rate: 1.0e-4\n  seed: 1\n  learning_rate: 1.0e-3\n"
    path = write(tmp_path / "r.yaml", text)
    assert validate(capsys, path) == (
        2,
        f"error: {path}:9: training.learning_rate: key 'learning_rate' defined twice: lines 7 and 9",
    )


def test_a_section_defined_twice_names_both_lines(capsys, tmp_path, data):
    text = "training:\n  seed: 1\n" + RECIPE.format(data=data) + "training:\n  max_steps: 5\n"
    path = write(tmp_path / "r.yaml", text)
    assert validate(capsys, path) == (2, f"error: {path}:8: training: key 'training' defined twice: lines 1 and 8")


def test_a_key_defined_twice_in_an_override(capsys, recipe):
    code, err = validate(capsys, recipe, "training={seed: 1, seed: 2}")
    assert (code, err) == (2, "error: command line: training.seed: key 'seed' defined twice in the value")


@pytest.mark.parametrize(
    ("extra", "line", "key", "expected"),
    [
        (
            "training:\n  learning_rate:\n",
            7,
            "training.learning_rate",
            "expected a valid number (Peak learning rate.)",
        ),
        ("training:\n  lr_scheduler: null\n", 7, "training.lr_scheduler", "expected 'linear', 'cosine'"),
        ("adapter:\n  target_modules: ~\n", 7, "adapter.target_modules", "expected a valid list or a valid string"),
        ("training:\n", 6, "training", "expected a mapping of keys"),
    ],
)
def test_a_null_value_says_null_not_missing(capsys, tmp_path, data, extra, line, key, expected):
    path = write(tmp_path / "r.yaml", RECIPE.format(data=data) + extra)
    code, err = validate(capsys, path)
    assert code == 2 and err.startswith(f"error: {path}:{line}: {key}: null is not allowed here; {expected}"), err
    assert "missing" not in err and "None" not in err


def test_a_null_override_says_null(capsys, recipe):
    code, err = validate(capsys, recipe, "output_dir=null")
    assert code == 2 and err.startswith("error: command line: output_dir: null is not allowed here; expected a valid")


def test_a_recipe_of_megabytes_is_refused_before_parsing(capsys, tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("model:\n  name: m\n" + "# padding\n" * 200_000)  # 2 MB of comments
    code, err = validate(capsys, path)
    assert code == 2 and err.startswith(f"error: {path}: the recipe is 2,000,017 bytes"), err
