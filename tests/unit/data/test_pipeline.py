"""build_datasets on whole recipes: mixing, validation splits, columns, truncation drops and stats."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from lora_tune.data import IGNORE_INDEX, build_datasets
from lora_tune.errors import DataError
from lora_tune.quickstart.tiny import build_tokenizer
from lora_tune.recipe.schema import Recipe

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def chat_row(i: int) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    }


def alpaca_row(i: int) -> dict[str, Any]:
    return {"instruction": f"task {i}", "input": "", "output": f"result {i}"}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [f"question answer task result {i} " + " ".join(WORDS) for i in range(40)]
    return build_tokenizer(corpus, vocab_size=300)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def make_recipe(tmp_path: Path, datasets: list[str], **fields: Any) -> Recipe:
    return Recipe(
        model={"name": "x"}, datasets=[{"path": p} for p in datasets], output_dir=str(tmp_path / "run"), **fields
    )


def texts(tokenizer, split) -> list[str]:
    return [tokenizer.decode(ids) for ids in split["input_ids"]]


def test_mixed_sources_are_concatenated_shuffled_and_masked(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(6)])
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([alpaca_row(i) for i in range(4)]), encoding="utf-8")
    prepared = build_datasets(make_recipe(tmp_path, [chats, str(alpaca)]), tokenizer)

    assert list(prepared.datasets) == ["train"]
    train = prepared.datasets["train"]
    assert train.column_names == ["input_ids", "labels"] and len(train) == 10
    rendered = texts(tokenizer, train)
    assert sorted(rendered) == sorted(
        [f"<|bos|><|user|>\nquestion {i}<|end|>\n<|assistant|>\nanswer {i}<|end|>\n" for i in range(6)]
        + [f"<|bos|><|user|>\ntask {i}<|end|>\n<|assistant|>\nresult {i}<|end|>\n" for i in range(4)]
    )
    assert rendered[:6] != sorted(rendered)[:6]  # shuffled, not chats then alpaca
    for row in train:
        trained = tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])
        assert trained.startswith(("answer ", "result ")) and trained.endswith("<|end|>")

    stats = prepared.stats
    assert stats.validation is None
    assert (stats.train.rows, stats.train.dropped, stats.train.truncated) == (10, 0, 0)
    assert stats.train.tokens == sum(len(ids) for ids in train["input_ids"])
    assert 0 < stats.train.trained_share < 1
    assert stats.summary().startswith("train: 10 rows, ")


def test_shuffle_follows_the_seed(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(12)])

    def order(seed: int) -> list[str]:
        prepared = build_datasets(make_recipe(tmp_path, [chats], training={"seed": seed}), tokenizer)
        return texts(tokenizer, prepared.datasets["train"])

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_val_size_holds_out_rows_before_tokenizing(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(10)])
    prepared = build_datasets(make_recipe(tmp_path, [chats], val_size=0.2), tokenizer)

    train, validation = prepared.datasets["train"], prepared.datasets["validation"]
    assert (len(train), len(validation)) == (8, 2)
    assert validation.column_names == ["input_ids", "labels"]
    train_texts, validation_texts = set(texts(tokenizer, train)), set(texts(tokenizer, validation))
    assert not train_texts & validation_texts and len(train_texts | validation_texts) == 10
    assert prepared.stats.validation is not None and prepared.stats.validation.rows == 2
    assert prepared.stats.summary().splitlines()[1].startswith("validation: 2 rows, ")


def test_eval_datasets_become_the_validation_split(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(5)])
    held_out = write_jsonl(tmp_path / "eval.jsonl", [alpaca_row(i) for i in range(3)])
    recipe = make_recipe(tmp_path, [chats], eval_datasets=[{"path": held_out, "limit": 2}])
    prepared = build_datasets(recipe, tokenizer)

    assert (len(prepared.datasets["train"]), len(prepared.datasets["validation"])) == (5, 2)
    assert all("task" in text for text in texts(tokenizer, prepared.datasets["validation"]))


def test_rows_left_without_assistant_tokens_by_truncation_are_dropped(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    long_question = {
        "messages": [{"role": "user", "content": " ".join(WORDS * 4)}, {"role": "assistant", "content": "ok"}]
    }
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(3)] + [long_question])
    with caplog.at_level(logging.WARNING, logger="lora_tune.data.pipeline"):
        prepared = build_datasets(make_recipe(tmp_path, [chats], training={"max_length": 24}), tokenizer)

    assert len(prepared.datasets["train"]) == 3
    assert prepared.stats.train.dropped == 1 and prepared.stats.train.rows == 3
    assert "train: dropped 1 of 4 rows" in caplog.text
    assert "1 dropped" in prepared.stats.summary()


def test_no_rows_left_after_truncation_is_an_error(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(3)])
    with pytest.raises(DataError, match=r"chat\.jsonl: no train rows left: truncation to max_length=4"):
        build_datasets(make_recipe(tmp_path, [chats], training={"max_length": 4}), tokenizer)


def test_val_size_that_leaves_no_training_rows(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(i) for i in range(2)])
    with pytest.raises(DataError, match="val_size 0.9 of 2 rows leaves no training rows"):
        build_datasets(make_recipe(tmp_path, [chats], val_size=0.9), tokenizer)


def test_row_errors_surface_before_tokenizing(tmp_path: Path, tokenizer) -> None:
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(0), {"messages": [{"role": "user", "content": "u"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl: line 2: field 'messages': has no assistant turn"):
        build_datasets(make_recipe(tmp_path, [chats]), tokenizer)


def test_template_errors_name_the_file_and_row(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(["question answer"], vocab_size=280)
    tokenizer.chat_template = "{{ messages | length }}" + tokenizer.chat_template
    chats = write_jsonl(tmp_path / "chat.jsonl", [chat_row(0)])
    with pytest.raises(DataError, match=r"chat\.jsonl: line 1: the chat template is not prefix-consistent"):
        build_datasets(make_recipe(tmp_path, [chats]), tokenizer)
