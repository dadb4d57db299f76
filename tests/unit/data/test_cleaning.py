"""Cleaning, splitting and mixing in build_datasets: empty turns, duplicates, ratio splits that never share an
example, explicit test sources, weights, too-long rows, skipped bad rows, the minimum-rows guard, test.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_tune.data import build_datasets, write_test_split
from lora_tune.errors import DataError
from lora_tune.quickstart.tiny import build_tokenizer
from lora_tune.recipe.load import RecipeError, load_recipe
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([f"question answer text {i} the a b c" for i in range(40)], vocab_size=300)


def chat(question: str, answer: str = "answer") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def recipe(tmp_path: Path, datasets: list[dict[str, Any]], **fields: Any) -> Recipe:
    return Recipe(model={"name": "x"}, datasets=datasets, output_dir=str(tmp_path / "run"), **fields)


def decoded(tokenizer, split) -> list[str]:
    return [tokenizer.decode(ids) for ids in split["input_ids"]]


def questions(tokenizer, split) -> list[str]:
    return sorted(text.split("<|user|>\n")[1].split("<|end|>")[0] for text in decoded(tokenizer, split))


def test_empty_turns_and_duplicates_are_dropped_and_counted(tmp_path: Path, tokenizer) -> None:
    rows = [chat("q1"), chat("q1"), chat("  "), chat("q2", "\n"), chat("Q1!  "), chat("q3")]
    rows.append({"messages": [{"role": "system", "content": " "}, *chat("q4")["messages"]]})  # blank system: removed
    data = write(tmp_path / "d.jsonl", rows)
    prepared = build_datasets(recipe(tmp_path, [{"path": data}]), tokenizer)
    drops = prepared.stats.drops
    assert (drops.empty, drops.duplicates) == (2, 1)
    assert questions(tokenizer, prepared.datasets["train"]) == ["Q1!  ", "q1", "q3", "q4"]
    assert "<|system|>" not in "".join(decoded(tokenizer, prepared.datasets["train"]))
    assert "dropped before tokenizing: 2 with an empty turn, 1 duplicates" in prepared.stats.summary()
    normalized = build_datasets(recipe(tmp_path, [{"path": data}], data={"dedupe": "normalized"}), tokenizer)
    assert normalized.stats.drops.duplicates == 2 and normalized.stats.train.rows == 3
    kept = build_datasets(recipe(tmp_path, [{"path": data}], data={"dedupe": "none"}), tokenizer)
    assert kept.stats.drops.duplicates == 0 and kept.stats.train.rows == 5


def test_default_split_is_8_1_1_seeded_and_disjoint(tmp_path: Path, tokenizer) -> None:
    data = write(tmp_path / "d.jsonl", [chat(f"q{i}") for i in range(50)])
    prepared = build_datasets(recipe(tmp_path, [{"path": data}], data={"split": True}), tokenizer)
    train, validation = (questions(tokenizer, prepared.datasets[n]) for n in ("train", "validation"))
    test = [e.messages[0]["content"] for e in prepared.test]
    assert (len(train), len(validation), len(test)) == (40, 5, 5)
    assert not (set(train) & set(validation)) and not (set(train) & set(test)) and not (set(validation) & set(test))
    again = build_datasets(recipe(tmp_path, [{"path": data}], data={"split": True}), tokenizer)
    assert [e.messages for e in again.test] == [e.messages for e in prepared.test]
    other_seed = recipe(tmp_path, [{"path": data}], data={"split": True}, training={"seed": 7})
    assert [e.messages for e in build_datasets(other_seed, tokenizer).test] != [e.messages for e in prepared.test]
    two_way = build_datasets(recipe(tmp_path, [{"path": data}], data={"split": [90, 10]}), tokenizer)
    assert (two_way.stats.train.rows, two_way.stats.validation.rows, two_way.stats.test_rows) == (45, 5, 0)


def test_kept_duplicates_never_land_in_two_splits(tmp_path: Path, tokenizer) -> None:
    rows = [chat(f"q{i % 10}") for i in range(60)]  # every example six times
    data = write(tmp_path / "d.jsonl", rows)
    fields = {"data": {"split": [6, 2, 2], "dedupe": "none"}}
    prepared = build_datasets(recipe(tmp_path, [{"path": data}], **fields), tokenizer)
    train, validation = (set(questions(tokenizer, prepared.datasets[n])) for n in ("train", "validation"))
    test = {e.messages[0]["content"] for e in prepared.test}
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert (len(train), len(validation), len(test)) == (6, 2, 2)
    assert prepared.stats.train.rows + prepared.stats.validation.rows + prepared.stats.test_rows == 60


def test_explicit_test_and_eval_sources_win_their_duplicates_from_training(tmp_path: Path, tokenizer) -> None:
    train = write(tmp_path / "train.jsonl", [chat(f"q{i}") for i in range(6)])
    valid = write(tmp_path / "valid.jsonl", [chat("q1"), chat("v")])
    test = write(tmp_path / "test.jsonl", [chat("q2"), chat("q1")])
    r = recipe(tmp_path, [{"path": train}], eval_datasets=[{"path": valid}], test_datasets=[{"path": test}])
    prepared = build_datasets(r, tokenizer)
    assert questions(tokenizer, prepared.datasets["train"]) == ["q0", "q3", "q4", "q5"]
    assert questions(tokenizer, prepared.datasets["validation"]) == ["v"]  # q1 is kept in test, the most held out
    assert [e.messages[0]["content"] for e in prepared.test] == ["q2", "q1"]
    assert prepared.stats.drops.held_out_duplicates == 3
    assert [(s.split, s.rows) for s in prepared.stats.sources] == [("train", 6), ("validation", 2), ("test", 2)]


def test_test_split_is_written_as_messages_jsonl_that_eval_can_read(tmp_path: Path, tokenizer) -> None:
    from lora_tune.data import load_rows, normalize_rows
    from lora_tune.recipe.schema import DatasetConfig

    data = write(tmp_path / "d.jsonl", [chat(f"q{i}", f"a{i}") for i in range(20)])
    prepared = build_datasets(recipe(tmp_path, [{"path": data}], data={"split": True}), tokenizer)
    path = write_test_split(prepared, RunDir(tmp_path))
    assert path == tmp_path / "test.jsonl"
    source = DatasetConfig(path=str(path))
    assert normalize_rows(load_rows(source), source) == [e.messages for e in prepared.test]
    assert (
        write_test_split(build_datasets(recipe(tmp_path, [{"path": data}]), tokenizer), RunDir(tmp_path / "x")) is None
    )


def test_weights_repeat_or_sample_each_training_source(tmp_path: Path, tokenizer) -> None:
    a = write(tmp_path / "a.jsonl", [chat(f"a{i}") for i in range(10)])
    b = write(tmp_path / "b.jsonl", [chat(f"b{i}") for i in range(10)])
    prepared = build_datasets(recipe(tmp_path, [{"path": a, "weight": 2.5}, {"path": b, "weight": 0.3}]), tokenizer)
    texts = questions(tokenizer, prepared.datasets["train"])
    from_a, from_b = [t for t in texts if t.startswith("a")], [t for t in texts if t.startswith("b")]
    assert len(from_a) == 25 and len(from_b) == 3
    assert all(from_a.count(f"a{i}") in (2, 3) for i in range(10))  # two whole copies, then a sample of half
    assert len(set(from_b)) == 3


def test_weights_apply_after_the_split_so_copies_stay_in_train(tmp_path: Path, tokenizer) -> None:
    a = write(tmp_path / "a.jsonl", [chat(f"a{i}") for i in range(20)])
    prepared = build_datasets(recipe(tmp_path, [{"path": a, "weight": 3}], data={"split": True}), tokenizer)
    train = questions(tokenizer, prepared.datasets["train"])
    held = set(questions(tokenizer, prepared.datasets["validation"])) | {
        e.messages[0]["content"] for e in prepared.test
    }
    assert len(train) == 3 * 16 and not (set(train) & held)


def test_too_long_rows_truncated_or_dropped(tmp_path: Path, tokenizer) -> None:
    data = write(tmp_path / "d.jsonl", [chat("q", "a"), chat("q " * 5, "answer " * 40)])
    truncated = build_datasets(recipe(tmp_path, [{"path": data}], training={"max_length": 40}), tokenizer)
    assert truncated.stats.train.rows == 2 and truncated.stats.train.truncated == 1
    fields = {"training": {"max_length": 40}, "data": {"too_long": "drop"}}
    dropped = build_datasets(recipe(tmp_path, [{"path": data}], **fields), tokenizer)
    assert dropped.stats.train.rows == 1 and dropped.stats.train.too_long == 1
    assert "1 dropped: over max_length" in dropped.stats.summary()


def test_texts_over_max_length_are_cut_into_pieces_never_truncated_or_dropped(tmp_path: Path, tokenizer) -> None:
    """Continued pretraining trains all of each document, in max_length pieces; data.too_long is for conversations."""
    from lora_tune.data.masking import tokenize_texts

    docs = [" ".join(f"text {i} a b c" for i in range(n)) for n in (30, 2, 12)]
    texts = write(tmp_path / "t.jsonl", [{"text": doc} for doc in docs])
    chats = write(tmp_path / "c.jsonl", [chat("q", "a"), chat("q " * 5, "answer " * 40)])
    whole = [pieces[0].input_ids for pieces in tokenize_texts(docs, tokenizer)]
    assert [len(ids) for ids in whole] == [166, 13, 63]  # cut below into 5 + 1 + 2 rows of at most 40 tokens
    fields = {"training": {"max_length": 40}, "data": {"too_long": "drop"}}
    prepared = build_datasets(recipe(tmp_path, [{"path": texts}, {"path": chats}], **fields), tokenizer)
    train, stats = prepared.datasets["train"], prepared.stats.train
    expected = [ids[i : i + 40] for ids in whole for i in range(0, len(ids), 40)]
    rows = train["input_ids"]
    text_rows = [ids for ids in rows if ids in expected]
    assert sorted(text_rows) == sorted(expected) and len(rows) == len(expected) + 1  # and the short conversation
    assert sum(map(len, text_rows)) == sum(map(len, whole))  # every token of every document, once
    assert (stats.rows, stats.cut_texts, stats.text_pieces, stats.too_long, stats.truncated) == (9, 2, 7, 1, 0)
    assert stats.describe().endswith("(2 texts over max_length cut into 7 pieces, 1 dropped: over max_length)")


def test_bad_rows_error_or_are_skipped_and_reported(tmp_path: Path, tokenizer, caplog) -> None:
    lines = [json.dumps(chat("q1")), '{"messages": [', json.dumps(chat("q2")), json.dumps({"instruction": "x"})]
    lines += [json.dumps({"messages": [{"role": "bot", "content": "x"}]})]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 is not valid JSON"):
        build_datasets(recipe(tmp_path, [{"path": str(path)}]), tokenizer)
    prepared = build_datasets(recipe(tmp_path, [{"path": str(path)}], data={"on_bad_rows": "skip"}), tokenizer)
    assert prepared.stats.train.rows == 2 and prepared.stats.drops.bad_rows == 3
    summary = prepared.stats.summary()
    assert "3 bad rows (line 2 is not valid JSON" in summary
    assert (
        "line 4: field 'messages': missing" in summary and "line 5: field 'messages[0].role': unknown role" in summary
    )
    assert "skipped 3 bad rows" in caplog.text


def test_fewer_rows_than_min_rows_stop_the_run(tmp_path: Path, tokenizer) -> None:
    data = write(tmp_path / "d.jsonl", [chat("q1"), chat("q1"), chat("q2"), chat(" ")])
    with pytest.raises(DataError) as info:
        build_datasets(recipe(tmp_path, [{"path": data}], data={"min_rows": 3}), tokenizer)
    message = str(info.value)
    assert message.startswith(
        f"{data}: only 2 training rows survive cleaning and truncation, fewer than data.min_rows"
    )
    assert "1 with an empty turn, 1 duplicates" in message


def test_tokenizing_in_two_processes_names_the_row_a_template_refuses(tmp_path: Path, tokenizer) -> None:
    rows = [chat(f"q{i}") for i in range(30)]
    turns = [("user", "a"), ("assistant", "x"), ("tool", "t"), ("assistant", "answer")]
    rows[17] = {"messages": [{"role": role, "content": content} for role, content in turns]}  # mistral has no tools
    data = write(tmp_path / "d.jsonl", rows)
    fields = {"data": {"num_proc": 2}, "model": {"name": "x", "chat_template": "mistral"}}
    tok = build_tokenizer(["q a x t c answer"] * 10, vocab_size=280)
    from lora_tune.model.chat_template import apply_chat_template_choice

    apply_chat_template_choice(tok, "mistral", "test")
    with pytest.raises(DataError, match=r"d\.jsonl: line 18: the chat template refused the conversation"):
        build_datasets(Recipe(datasets=[{"path": data}], output_dir=str(tmp_path / "r"), **fields), tok)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("val_size: 0.1\ndata: {split: true}\n", "val_size: give the split once"),
        ("data: {split: [8, 1, 1, 1]}\n", "data.split: has 4 values"),
        ("eval_datasets: [{path: d.jsonl}]\ndata: {split: true}\n", "data.split: has a validation share"),
        ("test_datasets: [{path: d.jsonl, weight: 2}]\n", "test_datasets.0.weight: applies to training sources"),
    ],
)
def test_split_settings_that_contradict_are_recipe_errors(tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps(chat("q")) + "\n")
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name: x}}\ndatasets: [{{path: {tmp_path / 'd.jsonl'}}}]\noutput_dir: o\n" + text)
    with pytest.raises(RecipeError, match=expected.replace(".", r"\.").replace("[", r"\[")):
        load_recipe(path, check_paths=False)


def test_large_splits_are_tokenized_once_then_read_from_the_datasets_cache(
    tmp_path: Path, tokenizer, monkeypatch
) -> None:
    import datasets

    from lora_tune.data import masking, pipeline

    monkeypatch.setattr(pipeline, "CACHE_FROM_ROWS", 10)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data = write(tmp_path / "d.jsonl", [chat(f"q{i}") for i in range(12)])
    first = build_datasets(recipe(tmp_path, [{"path": data}]), tokenizer)
    assert len(list((tmp_path / "cache" / "lora_tune").glob("tokenized-*.arrow"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of read from the cache")

    monkeypatch.setattr(masking, "tokenize_conversations", refuse)
    second = build_datasets(recipe(tmp_path, [{"path": data}]), tokenizer)
    assert second.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # other settings: a different cache entry
        build_datasets(recipe(tmp_path, [{"path": data}], training={"max_length": 50}), tokenizer)


def test_text_and_chat_sources_mix_in_one_run(tmp_path: Path, tokenizer) -> None:
    from lora_tune.data import IGNORE_INDEX

    chats = write(tmp_path / "chat.jsonl", [chat(f"q{i}") for i in range(3)])
    texts = write(tmp_path / "text.jsonl", [{"text": f"the a b c {i}"} for i in range(2)])
    prepared = build_datasets(recipe(tmp_path, [{"path": chats}, {"path": texts}]), tokenizer)
    train = prepared.datasets["train"]
    assert len(train) == 5
    fully = [all(label != IGNORE_INDEX for label in labels) for labels in train["labels"]]
    assert sum(fully) == 2  # the two texts; the chats train only their answers
    plain = [tokenizer.decode(ids) for ids, full in zip(train["input_ids"], fully, strict=True) if full]
    assert sorted(plain) == ["the a b c 0<|end|>", "the a b c 1<|end|>"]
