"""Every data format (and the non-JSON sources) trains end to end on the tiny model: a few 4-bit QLoRA steps each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_tune.cli import main
from tests.conftest import FRUITS

RECIPE = """\
model:
  name: {model}
  dtype: float32
  chat_template: {template}
quantization:
  bits: 4
adapter:
  r: 4
  alpha: 8
datasets:
  - {source}
data:
  split: [8, 1, 1]
training:
  max_steps: 2
  batch_size: {batch_size}
  max_length: {max_length}
  logging_steps: 1
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
{extra}"""


def pairs(n: int = 20) -> list[tuple[str, str]]:
    return [(f"fruit number {i}?", FRUITS[i % len(FRUITS)] + f" {i}") for i in range(n)]


def sharegpt_rows() -> list[dict[str, Any]]:
    tools = json.dumps([{"name": "lookup", "description": "fruit by number", "parameters": {"type": "object"}}])
    rows = []
    for i, (question, answer) in enumerate(pairs()):
        turns = [{"from": "human", "value": question}]
        if i % 2:  # half of the rows call a tool first
            turns.append({"from": "function_call", "value": json.dumps({"name": "lookup", "arguments": {"n": i}})})
            turns.append({"from": "observation", "value": answer})
        turns.append({"from": "gpt", "value": answer})
        rows.append({"conversations": turns, "tools": tools if i % 2 else ""})  # an empty cell: no tools
    return rows


# The tiny tokenizer has no ChatML tokens: <|im_end|> is several tokens and not its EOS, which the pre-flight
# check rightly flags; the tool rows also carry the Hermes tool prompt (~600 byte-level tokens).
TOOLS_EXTRA = "preflight: {on_failure: warn}\n"
FORMATS: dict[str, tuple[str, str, list[dict[str, Any]]]] = {  # name: (template, source options, rows)
    "sharegpt-tools": ("chatml", "", sharegpt_rows()),
    "prompt_completion": ("null", "", [{"prompt": q, "completion": a} for q, a in pairs()]),
    "text": ("null", "", [{"text": f"{q} {a}. " * 3} for q, a in pairs()]),
    "columns": ("null", "columns: {instruction: q, output: a}", [{"q": q, "a": a} for q, a in pairs()]),
}


def write_source(root: Path, name: str, rows: list[dict[str, Any]], suffix: str) -> Path:
    path = root / f"{name}{suffix}"
    if suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == "":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("name", "suffix"),
    [("sharegpt-tools", ".jsonl"), ("prompt_completion", ".csv"), ("text", ".parquet"), ("columns", "")],
)
def test_format_trains_end_to_end(tiny_model_dir: Path, tmp_path: Path, name: str, suffix: str) -> None:
    template, options, rows = FORMATS[name]
    data = write_source(tmp_path, name, rows, suffix)
    source = "{" + ", ".join(x for x in (f"path: {data}", options) if x) + "}"
    recipe = tmp_path / "recipe.yaml"
    tools = name == "sharegpt-tools"
    text = RECIPE.format(
        model=tiny_model_dir,
        template=template,
        source=source,
        out=tmp_path / "run",
        max_length=768 if tools else 96,
        batch_size=1 if tools else 4,
        extra=TOOLS_EXTRA if tools else "",
    )
    recipe.write_text(text)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_rows"] == 16 and summary["eval_loss"] is not None
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(loss == loss and loss > 0 for loss in losses)  # finite, positive: tokens were trained
    test_rows = [json.loads(line) for line in (run / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == 2
    assert ("text" in test_rows[0]) == (name == "text")
    if name == "text":
        assert summary["trained_token_share"] == 1.0  # plain text: every token is trained
    else:
        assert 0 < summary["trained_token_share"] < 1  # assistant-only masking
    if name == "prompt_completion":  # the saved test split is what `lora-tune eval` reads
        assert main(["eval", str(run), "--data", str(run / "test.jsonl"), "--max-new-tokens", "4"]) == 0
        assert json.loads((run / "eval.json").read_text())["rows"] == 2
