"""`lora-tune data`: the preview prints counts, lengths, padding and highlighted examples, loading no weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.data.preview import LengthStats, highlight
from tests.conftest import fruit_rows, write_jsonl

RECIPE = """\
model:
  name: {model}
  chat_template: {template}
datasets:
  - path: {data}
val_size: 0.25
training:
  max_length: 256
  batch_size: 4
  packing: {packing}
output_dir: {out}
"""


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load model weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the preview must not load model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr("lora_tune.model.load.load_model", refuse)


def write_recipe(tmp_path: Path, model: Path, *, template: str = "alpaca", packing: bool = False) -> Path:
    rows = fruit_rows(12, "messages")
    rows[0]["messages"][0]["content"] = "fruit number 0? Answer with one word."  # a longer row
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(model=model, data=data, out=tmp_path / "run", template=template, packing=str(packing).lower())
    recipe.write_text(text)
    return recipe


def test_preview_through_the_cli(tiny_model_dir: Path, tmp_path: Path, capsys, no_weights) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir)
    assert main(["data", str(recipe), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train\.jsonl\s+12 rows\s+\(train\)", out)
    # 12 rows, 2 of them exact duplicates (dropped), 10 left; val_size 0.25 holds out round(2.5) = 2.
    assert "train: 8 rows" in out and "validation: 2 rows" in out
    assert "dropped before tokenizing: 2 duplicates" in out
    assert re.search(r"train\s+min \d+  median [\d.]+  p95 \d+  max \d+", out)
    assert re.search(r"padded: \d+\.\d% padding \(2 batches\) \[this run\]; packed: 0\.0% padding", out)
    assert "loss on: assistant tokens;  chat template: alpaca (built-in)" in out
    assert out.count("--- example ") == 2 and "--- example 1 of 8" in out
    # Piped output: markers around exactly the trained tokens: the answer and EOS, nothing of the prompt.
    trained = [t for t in re.findall(r"⟦(.*?)⟧", out, flags=re.S) if t != "…"]  # "…" is in the legend
    assert len(trained) == 2 and all(t.endswith("<|end|>") for t in trained)
    assert all(
        t.removesuffix("<|end|>")
        in {"apple", "banana", "cherry", "grape", "lemon", "mango"} | {"orange", "pear", "plum"}
        for t in trained
    )
    assert "### Instruction:" in out and "\x1b[" not in out


def test_preview_of_a_packed_run_with_full_loss(tiny_model_dir: Path, tmp_path: Path, capsys, no_weights) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, template="chatml", packing=True)
    assert main(["data", str(recipe), "training.train_on=all", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"packed: 0\.0% padding \(\d+ batches, \d+ packed rows\) \[this run\]; padded: ", out)
    assert "loss on: all tokens;  chat template: chatml (built-in)" in out
    shown = re.search(r"--- example 1 of \d+ \((\d+) tokens, (\d+) trained", out)
    assert shown and shown[1] == shown[2]  # the pipeline honours train_on: all
    assert "train: 8 rows" in out and "100.0% trained" in out


def test_preview_reports_a_bad_template_name_as_a_recipe_error(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, template="chatmll")
    assert main(["data", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "model.chat_template: unknown template 'chatmll'; built-ins: chatml" in err and len(err.splitlines()) == 1


def test_highlight_colours_trained_runs_on_a_terminal() -> None:
    from lora_tune.quickstart.tiny import build_tokenizer

    tokenizer = build_tokenizer(["ab cd ef"] * 10, vocab_size=270)
    ids = tokenizer("ab cd ef", add_special_tokens=False)["input_ids"]
    labels = [-100] * (len(ids) - 1) + [ids[-1]]
    coloured = highlight(ids, labels, tokenizer, color=True)
    assert coloured.endswith("\x1b[0m") and "\x1b[1;32m" in coloured
    assert highlight(ids, labels, tokenizer, color=False).endswith("⟧")


def test_length_stats() -> None:
    stats = LengthStats.of(list(range(1, 101)))
    assert (stats.min, stats.median, stats.p95, stats.max) == (1, 50.5, 95, 100)


def test_preview_reports_skipped_bad_rows_and_the_test_split(
    tiny_model_dir: Path, tmp_path: Path, capsys, no_weights
) -> None:
    rows = fruit_rows(9, "messages") + [{"messages": [{"role": "robot", "content": "x"}]}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    with (tmp_path / "train.jsonl").open("a") as f:
        f.write("{not json\n")
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(model=tiny_model_dir, data=data, out=tmp_path / "run", template="alpaca", packing="false")
    recipe.write_text(text.replace("val_size: 0.25\n", "data: {on_bad_rows: skip, split: [7, 1, 1]}\n"))
    assert main(["data", str(recipe), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train\.jsonl\s+9 rows\s+\(train; 2 bad rows skipped\)", out)
    assert "train: 7 rows" in out and "validation: 1 rows" in out and "test: 1 rows" in out
    assert "dropped before tokenizing: 2 bad rows (line 10: field 'messages[0].role': unknown role 'robot'" in out
    assert "line 11 is not valid JSON" in out
