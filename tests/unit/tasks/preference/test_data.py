"""Preference rows: both layouts become one conversational form; rows that cannot teach a preference are refused
with their file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.data.sources import MAX_ROW_CHARS
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig
from lora_tune.tasks.preference.data import read_preference_rows
from tests.conftest import write_jsonl

USER = {"role": "user", "content": "2+2?"}


def read(tmp_path: Path, rows: list[dict], *, kto: bool = False, **source) -> list[dict]:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return read_preference_rows(DatasetConfig(path=str(path), **source), kto=kto)


def test_string_and_conversational_pairs_give_the_same_example(tmp_path: Path):
    strings = read(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    turns = read(
        tmp_path,
        [
            {
                "prompt": "2+2?",
                "chosen": [USER, {"role": "assistant", "content": "4"}],
                "rejected": [USER, {"role": "assistant", "content": "5"}],
            }
        ],
    )
    expected = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}], "rejected": [
        {"role": "assistant", "content": "5"}]}  # fmt: skip
    assert strings == turns == [expected]


def test_multi_turn_context_is_kept_and_a_system_prompt_added(tmp_path: Path):
    history = [USER, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    rows = read(
        tmp_path,
        [
            {
                "chosen": [*history, {"role": "assistant", "content": "6"}],
                "rejected": [*history, {"role": "assistant", "content": "7"}],
            }
        ],
        system_prompt="Be brief.",
    )
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."}, *history]


def test_column_mapping(tmp_path: Path):
    rows = read(
        tmp_path,
        [{"question": "2+2?", "good": "4", "bad": "5"}],
        columns={"prompt": "question", "chosen": "good", "rejected": "bad"},
    )
    assert rows[0]["chosen"][0]["content"] == "4"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "2+2?", "chosen": "4", "rejected": "4"}, "chosen equals rejected"),
        ({"prompt": "2+2?", "chosen": " ", "rejected": "5"}, "chosen is empty"),
        ({"prompt": "2+2?", "chosen": "4"}, "'rejected' is missing"),
        (
            {
                "chosen": [USER, {"role": "assistant", "content": "4"}],
                "rejected": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "5"}],
            },
            "different prompts",
        ),
        ({"prompt": "2+2?", "chosen": [{"role": "user", "content": "x"}], "rejected": "5"}, "must be a string"),
    ],
)
def test_rows_that_teach_nothing_are_refused_with_file_and_line(tmp_path: Path, row: dict, message: str):
    good = {"prompt": "1+1?", "chosen": "2", "rejected": "3"}
    with pytest.raises(DataError, match=message) as caught:
        read(tmp_path, [good, row])
    assert "pairs.jsonl: line 2" in caught.value.render()


def test_kto_rows_need_a_boolean_label(tmp_path: Path):
    rows = read(tmp_path, [{"prompt": "2+2?", "completion": "4", "label": True}], kto=True)
    assert rows == [{"prompt": [USER], "completion": [{"role": "assistant", "content": "4"}], "label": True}]
    with pytest.raises(DataError, match="label must be true or false"):
        read(tmp_path, [{"prompt": "2+2?", "completion": "4", "label": "yes"}], kto=True)


def test_a_pair_at_the_row_bound_is_read_and_one_character_more_is_refused(tmp_path: Path):
    """Preference rows have the SFT rows' bound, counted the same way: every text of the example, role names too."""
    roles = len("user") + 2 * len("assistant")
    room = MAX_ROW_CHARS - len("2+2?") - len("5") - roles
    assert len(read(tmp_path, [{"prompt": "2+2?", "chosen": "4" * room, "rejected": "5"}])) == 1
    with pytest.raises(DataError) as caught:
        read(tmp_path, [{"prompt": "2+2?", "chosen": "4" * (room + 1), "rejected": "5"}])
    assert str(caught.value).startswith(
        f"{tmp_path / 'pairs.jsonl'}: line 1: field 'chosen': has 4,000,001 characters of text, over the 4,000,000"
    )
