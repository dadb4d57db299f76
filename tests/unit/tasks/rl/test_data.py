"""RL prompts: prompt rows keep their columns for the rewards; a chat row's last answer becomes the reference; rows
that leave nothing to answer are refused with their file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig
from lora_tune.tasks.rl.data import prompt_rows_with_origins
from tests.conftest import fruit_rows, write_jsonl


def rows_of(path: Path, **source) -> list[dict]:
    return [row for _, row in prompt_rows_with_origins(DatasetConfig(path=str(path), **source), "answer")]


def test_prompt_rows_keep_their_columns(tmp_path: Path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4", "level": 1}])
    assert rows_of(path) == [{"answer": "4", "level": 1, "prompt": [{"role": "user", "content": "2+2?"}]}]


@pytest.mark.parametrize("form", ["alpaca", "messages"])
def test_a_chat_rows_last_answer_is_the_reference(tmp_path: Path, form: str):
    path = write_jsonl(tmp_path / "c.jsonl", fruit_rows(2, form))
    first = rows_of(path, system_prompt="Be brief.")[0]
    assert first["answer"] == "apple"
    assert first["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert first["prompt"][-1]["role"] == "user" and "fruit number 0?" in first["prompt"][-1]["content"]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "  ", "answer": "x"}, "prompt is empty"),
        ({"prompt": [{"role": "assistant", "content": "hi"}]}, "must end with a user turn"),
        ({"prompt": 3}, "prompt must be text or a list"),
    ],
)
def test_a_prompt_row_that_leaves_nothing_to_answer_is_refused(tmp_path: Path, row: dict, message: str):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok?", "answer": "y"}, row])
    with pytest.raises(DataError, match=message) as caught:
        rows_of(path, format="prompts")
    assert "p.jsonl: line 2: field 'prompt'" in str(caught.value)
