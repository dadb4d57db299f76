"""Fuzz: randomly broken recipes and dataset files through validation and loading.

Every input either loads or fails with a LoraTuneError (one line, exit 2): never another exception, never a hang.
Seeded and bounded: the same cases run every time, each under an alarm.
"""

from __future__ import annotations

import copy
import json
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_tune.errors import LoraTuneError
from lora_tune.recipe.load import load_recipe

SEED = 20261124
RECIPE_CASES, DATA_CASES, SECONDS_PER_CASE = 300, 120, 10

VALID: dict[str, Any] = {
    "model": {"name": "some/model", "dtype": "float32", "chat_template": "chatml"},
    "quantization": {"bits": 4, "quant_type": "nf4"},
    "adapter": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
    "datasets": [{"path": "DATA", "format": "auto", "limit": 10}],
    "val_size": 0.1,
    "training": {"learning_rate": 1e-4, "max_steps": 5, "batch_size": 2, "eval_strategy": "steps", "eval_steps": 2},
    "preflight": {"on_failure": "warn"},
    "output_dir": "runs/x",
}
ODD_VALUES: list[Any] = [
    None, 0, -1, 2**70, 1.5, -0.5, float("nan"), True, "", "x" * 5000, "ünïcødé ✓", "a.b=c", "{{ bad", [], [1, "a"],
    {}, {"nested": {"deep": [None]}}, "4", "auto", "../../etc/passwd", "\x00", "1e999",
]  # fmt: skip


@contextmanager
def deadline(seconds: int, case: str) -> Iterator[None]:
    """Fail the case instead of hanging: SIGALRM interrupts it."""

    def expire(signum: int, frame: Any) -> None:  # noqa: ARG001
        raise TimeoutError(f"{case}: still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            out += paths(value, (*prefix, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            out += paths(value, (*prefix, i))
    return out


def mutate(rng: random.Random, recipe: dict[str, Any]) -> dict[str, Any]:
    recipe = copy.deepcopy(recipe)
    for _ in range(rng.randint(1, 3)):
        where = rng.choice(paths(recipe))
        parent = recipe
        for key in where[:-1]:
            parent = parent[key]
        action = rng.random()
        if action < 0.3 and isinstance(parent, dict):
            parent.pop(where[-1], None)
        elif action < 0.4 and isinstance(parent, dict):
            parent[rng.choice(["typo", "lerning_rate", "r ", "bits"])] = rng.choice(ODD_VALUES)
        else:
            parent[where[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
    return recipe


def corrupt_text(rng: random.Random, text: str) -> str:
    kind = rng.randrange(4)
    cut = rng.randrange(len(text))
    if kind == 0:
        return text[:cut]
    if kind == 1:
        return (
            text[:cut]
            + rng.choice([":", "\t", "{", "[", "&a", "*b", "!!python/object:os.system", "- -", "'"])
            + text[cut:]
        )
    if kind == 2:
        return text.replace("  ", rng.choice([" ", "   ", "\t"]), 1)
    return "extends: " + rng.choice(["missing.yaml", "/", "", "[1]"]) + "\n" + text


def outcome(action: Callable[[], Any], case: str) -> str:
    try:
        with deadline(SECONDS_PER_CASE, case):
            action()
    except LoraTuneError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"{case}: multi-line error {message!r}"
        return "error"
    except Exception as exc:  # noqa: BLE001 - exactly what this test hunts for
        pytest.fail(f"{case}: {type(exc).__name__}: {exc}")
    return "ok"


def test_randomly_broken_recipes_fail_cleanly(tmp_path: Path):
    rng = random.Random(SEED)
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 20)
    base = json.loads(json.dumps(VALID).replace("DATA", str(data)))
    seen = {"ok": 0, "error": 0}
    for i in range(RECIPE_CASES):
        path = tmp_path / f"r{i}.yaml"
        text = yaml.safe_dump(mutate(rng, base), allow_unicode=True)
        if rng.random() < 0.3:
            text = corrupt_text(rng, text)
        path.write_text(text, encoding="utf-8")
        overrides = [
            f"{rng.choice(['training.seed', 'adapter', 'x.y', 'datasets.0.path', 'a..b'])}={rng.choice(ODD_VALUES)}"
        ]
        seen[
            outcome(lambda p=path, o=overrides: load_recipe(p, o if rng.random() < 0.2 else []), f"recipe case {i}")
        ] += 1
    # The generator must exercise both sides, or it tests nothing.
    assert seen["error"] > RECIPE_CASES // 2 and seen["ok"] > 5, seen


def broken_row(rng: random.Random, i: int) -> Any:
    good = rng.choice(
        [
            {"instruction": f"q{i}", "input": "", "output": f"a{i}"},
            {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]},
        ]
    )
    if rng.random() < 0.85:
        return good
    where = rng.choice(paths(good))
    parent = good
    for key in where[:-1]:
        parent = parent[key]
    if rng.random() < 0.3 and isinstance(parent, dict):
        parent.pop(where[-1])
    else:
        parent[where[-1]] = copy.deepcopy(rng.choice(ODD_VALUES + [{"role": "wizard"}, [{"role": "user"}]]))
    return good if rng.random() < 0.9 else rng.choice([[good], "text", 3, None])


def test_randomly_broken_dataset_rows_fail_cleanly(tmp_path: Path):
    from lora_tune.data import build_datasets
    from lora_tune.quickstart.tiny import build_tokenizer
    from lora_tune.recipe.schema import Recipe

    tokenizer = build_tokenizer([f"q{i} a{i} user assistant" for i in range(50)], vocab_size=300)
    rng = random.Random(SEED + 1)
    seen = {"ok": 0, "error": 0}
    for i in range(DATA_CASES):
        suffix = rng.choice([".jsonl", ".jsonl", ".json"])
        path = tmp_path / f"d{i}{suffix}"
        rows = [broken_row(rng, j) for j in range(rng.randint(0, 6))]
        raw = (json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)).encode()
        if rng.random() < 0.15 and raw:
            raw = rng.choice(
                [raw[: rng.randrange(len(raw))], raw + b"\xff\xfe{", b"\x00" + raw, raw.replace(b"}", b"", 1)]
            )
        path.write_bytes(raw)
        recipe = Recipe(
            model={"name": "x", "chat_template": "chatml"},
            datasets=[{"path": str(path), "format": rng.choice(["auto", "messages", "alpaca"])}],
            training={"max_length": rng.choice([8, 64, 64, None])},
            output_dir=str(tmp_path / "run"),
        )
        seen[outcome(lambda r=recipe: build_datasets(r, tokenizer), f"data case {i} ({path.name})")] += 1
    assert seen["error"] > DATA_CASES // 4 and seen["ok"] > 5, seen
