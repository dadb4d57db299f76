"""The "From zero to a pushed model" guide (docs/guide.md), run as written on a tiny model; and `lora-tune new` output.

The guide's commands are read from docs/guide.md (between the guide markers), so the test and the docs cannot drift.
Recipe verbs get overrides for the tiny model, the run length and the CPU only; everything else is the catalog
recipe the guide extends.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import fruit_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(model_dir: Path) -> list[str]:
    return [
        f"model.name={model_dir}",
        "model.dtype=float32",
        "training.max_steps=4",
        "training.batch_size=4",
        "training.gradient_accumulation_steps=1",
        "training.max_length=64",
        "training.optimizer=adamw_torch",  # paged 8-bit AdamW is a CUDA optimizer
        "val_size=0.2",  # the recipe's 1% of 60 rows would be no row
    ]


def guide_steps() -> list[tuple[str, str]]:
    """The guide's steps: ('file', text) for the heredoc that writes my.yaml, ('run', command) for the others."""
    guide = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    block = guide.split("<!-- guide:start -->", 1)[1].split("<!-- guide:end -->", 1)[0]
    lines = block.strip().removeprefix("```bash").removesuffix("```").strip().splitlines()
    steps: list[tuple[str, str]] = []
    while lines:
        line = lines.pop(0)
        if line.startswith("cat > my.yaml <<'EOF'"):
            end = lines.index("EOF")
            steps.append(("file", "\n".join(lines[:end]) + "\n"))
            lines = lines[end + 1 :]
        else:
            steps.append(("run", " ".join(shlex.split(line, comments=True))))
    return steps


def test_guide_has_every_step():
    commands = [text for kind, text in guide_steps() if kind == "run"]
    verbs = [c.split()[1] for c in commands if c.startswith("lora-tune ")]
    assert commands[0] == "pip install -e ."  # the install step: `make test` itself runs it on a fresh checkout
    assert verbs == ["recipes", "data", "train", "eval", "merge", "push"]
    assert "--dry-run" in commands[-1]


def test_guide_runs_on_a_tiny_model(tiny_model_dir: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")  # a checkout's catalog, as the guide assumes
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", fruit_rows(60, "messages"))
    write_jsonl(tmp_path / "data" / "test.jsonl", fruit_rows(9, "alpaca"))
    outputs = {}
    for kind, text in guide_steps():
        if kind == "file":
            (tmp_path / "my.yaml").write_text(text)
            continue
        if not text.startswith("lora-tune "):
            continue  # pip install: this test runs inside the installed package
        argv = text.split()[1:]
        if argv[0] in ("data", "train"):
            argv += tiny_overrides(tiny_model_dir)
        if argv[0] == "eval":
            argv += ["--max-new-tokens", "4"]
        assert main(argv) == 0, text
        outputs[argv[0]] = capsys.readouterr().out

    assert "qwen/qwen2.5-7b-instruct-qlora-chat" in outputs["recipes"]
    assert "example 1 of" in outputs["data"]
    run = tmp_path / "runs" / "my-qwen"
    resolved = (run / "recipe.yaml").read_text()
    assert "bits: 4" in resolved and "max_grad_norm: 0.3" in resolved  # the catalog recipe's settings
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["quantized_layers"] == 14
    assert json.loads((run / "eval.json").read_text())
    assert (tmp_path / "merged" / "my-qwen" / "config.json").is_file()
    assert outputs["push"].startswith("Would upload merged model") and "-> me/my-qwen" in outputs["push"]


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_new_writes_a_recipe_that_trains(method: str, tiny_model_dir: Path, tmp_path: Path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(40, "alpaca"))
    assert main(["new", "--model", str(tiny_model_dir), "--method", method, "--data", str(data)]) == 0
    recipe = tmp_path / "my.yaml"
    recipe.write_text(capsys.readouterr().out)
    assert main(["validate", str(recipe)]) == 0
    capsys.readouterr()
    out = f"output_dir={tmp_path / 'run'}"
    assert main(["train", str(recipe), "training.max_steps=2", "training.optimizer=adamw_torch", out]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["quantized_layers"] == (14 if method == "qlora" else 0)
