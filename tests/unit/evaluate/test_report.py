"""The evaluation report's Markdown and console forms, and where `eval` finds its data; no model needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.evaluate.report import format_markdown
from lora_tune.evaluate.result import EvalReport, Score
from lora_tune.evaluate.run import EvalDataError, resolve_eval_data
from lora_tune.evaluate.scores import classification_scores
from lora_tune.run.layout import RunDir
from lora_tune.tasks.sft.evaluate import format_report


def report(with_base: bool = True) -> EvalReport:
    labels = ["yes", "no"]
    tuned = classification_scores(["yes", "no", "no"], ["yes", "no", "yes"], labels).to_json()
    base = classification_scores(["(other)", "yes", "(other)"], ["yes", "no", "yes"], labels).to_json()
    return EvalReport(
        data="test.jsonl",
        rows=3,
        tuned=Score(2 / 3, 2 / 3, 1.5, tuned),
        base=Score(0.0, 0.0, 40.0, base) if with_base else None,
        task="labels",
        labels=labels,
        settings={"max_new_tokens": 8, "do_sample": False},
        scored_tokens=6,
        examples=[{"input": "Is it | so?", "reference": "yes", "base": "maybe\x07", "tuned": "yes"}],
        files={"loss_curve": "loss.png"},
    )


def test_markdown_side_by_side() -> None:
    text = format_markdown(report(), "my-run")
    assert text.startswith("# Evaluation of `my-run`")
    assert "| metric | base | fine-tuned |" in text
    assert "| exact match | 0.0% | 66.7% |" in text
    assert "| reference perplexity | 40 | 1.5 |" in text
    assert "| accuracy (labels) | 0.0% | 66.7% |" in text
    # tuned: yes P=1 R=1/2 F1=2/3; no P=1/2 R=1 F1=2/3 -> macro F1 2/3.
    assert "| macro F1 | 0 | 0.6667 |" in text
    assert "| `yes` | 1 | 0.5 | 0.6667 | 2 |" in text
    assert "|  | `yes` | `no` | `(other)` |" in text  # the base's confusion matrix has an (other) column
    assert "![train and eval loss against step](loss.png)" in text
    assert "| Is it \\| so? | yes | maybe\\x07 | yes |" in text  # pipes escaped, control characters visible


def test_markdown_and_console_without_base() -> None:
    text = format_markdown(report(with_base=False), "r")
    assert "| metric | fine-tuned |" in text and "| exact match | 66.7% |" in text and "Base" not in text
    console = format_report(report(with_base=False), "runs/r")
    assert "fine-tuned" in console and "base" not in console.split("\n")[1]


def test_where_eval_finds_its_data(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert resolve_eval_data(run, "x.jsonl", None) == Path("x.jsonl")
    with pytest.raises(EvalDataError, match="no 'test' split saved in the run"):
        resolve_eval_data(run, None, None)
    (tmp_path / "test.jsonl").write_text("{}\n")
    assert resolve_eval_data(run, None, None) == tmp_path / "test.jsonl"
    with pytest.raises(EvalDataError, match="either --data FILE or --split NAME"):
        resolve_eval_data(run, "x.jsonl", "test")


def test_label_set_choice_and_references_outside_it() -> None:
    from lora_tune.recipe.schema import EvalConfig
    from lora_tune.tasks.sft.evaluate import _classification, _label_set

    references = ["yes", "no", "yes", "no"]
    assert _label_set(EvalConfig(), references) == ["yes", "no"]  # inferred
    assert _label_set(EvalConfig(task="text"), references) is None
    assert _label_set(EvalConfig(labels=["no", "yes", "maybe"]), references) == ["no", "yes", "maybe"]
    assert _label_set(EvalConfig(), ["Paris", "Rome"]) is None  # free text
    with pytest.raises(EvalDataError, match="do not look like a label set"):
        _label_set(EvalConfig(task="labels"), ["Paris", "Rome"])
    with pytest.raises(EvalDataError, match="row 2: reference 'perhaps' is none of the labels"):
        _classification(["yes", "no"], ["yes", "perhaps"], ["yes", "no"])
    scores = _classification(["Yes.", "The answer is no"], ["yes", "No"], ["yes", "no"])
    assert scores is not None and scores["accuracy"] == 1.0
