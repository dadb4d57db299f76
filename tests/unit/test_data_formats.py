"""Format detection and conversion of alpaca and messages rows to canonical conversations, and their errors."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from lora_tune.config import DatasetConfig
from lora_tune.data import detect_format, normalize_rows
from lora_tune.errors import DataError

FILE = "data.jsonl"


def normalize(rows: list[dict[str, Any]], **cfg: Any) -> list[list[dict[str, str]]]:
    return normalize_rows(rows, DatasetConfig(path=FILE, **cfg))


def chat(*roles: str) -> dict[str, Any]:
    """A messages row whose turns have these roles."""
    return {"messages": [{"role": role, "content": f"{role} text"} for role in roles]}


def error_of(rows: list[dict[str, Any]], **cfg: Any) -> str:
    with pytest.raises(DataError) as info:
        normalize(rows, **cfg)
    return str(info.value)


def test_alpaca_without_input() -> None:
    assert normalize([{"instruction": "Name a colour.", "output": "Blue."}]) == [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ]


@pytest.mark.parametrize("empty", ["", "  \n", None])
def test_alpaca_empty_input_is_ignored(empty: str | None) -> None:
    [conversation] = normalize([{"instruction": "Say hi.", "input": empty, "output": "Hi."}])
    assert conversation[0] == {"role": "user", "content": "Say hi."}


def test_alpaca_with_input_and_system() -> None:
    row = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "Be brief."}
    assert normalize([row], format="alpaca") == [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Translate.\n\nBonjour"},
            {"role": "assistant", "content": "Hello"},
        ]
    ]


def test_messages_multi_turn_with_system_keeps_only_role_and_content() -> None:
    turns = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1", "weight": 0},
        {"role": "user", "content": "u2", "name": "bob"},
        {"role": "assistant", "content": "a2"},
    ]
    [conversation] = normalize([{"messages": turns, "id": 7}])
    assert conversation == [{"role": t["role"], "content": t["content"]} for t in turns]


def test_conversations_column_holds_the_messages_form() -> None:
    turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert normalize([{"conversations": turns}]) == [turns]


def test_system_prompt_is_added_only_where_there_is_no_system_turn() -> None:
    rows = [chat("user", "assistant"), chat("system", "user", "assistant")]
    first, second = normalize(rows, system_prompt="default")
    assert first[0] == {"role": "system", "content": "default"}
    assert second[0] == {"role": "system", "content": "system text"} and len(second) == 3


def test_alpaca_row_system_wins_over_system_prompt() -> None:
    rows = [{"instruction": "i", "output": "o", "system": "row"}, {"instruction": "i", "output": "o"}]
    first, second = normalize(rows, system_prompt="default")
    assert first[0]["content"] == "row" and second[0]["content"] == "default"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"messages": []}, "messages"),
        ({"conversations": [], "id": 1}, "messages"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
    ],
)
def test_detect_format(row: dict[str, Any], expected: str) -> None:
    assert detect_format(row, file=FILE) == expected


def test_unknown_format_names_the_columns_found() -> None:
    message = error_of([{"question": "p", "answer": "c"}])
    assert message.startswith(f"{FILE}: row 1: cannot detect the format from the columns (answer, question)")


def test_ambiguous_format_names_the_columns_found() -> None:
    message = error_of([{"messages": [], "instruction": "i", "output": "o"}])
    assert "ambiguous format: the columns (instruction, messages, output) fit both messages and alpaca" in message


def test_explicit_format_skips_detection() -> None:
    row = {"instruction": "i", "output": "o", "messages": "unused"}
    assert normalize([row], format="alpaca")[0][-1] == {"role": "assistant", "content": "o"}


def test_empty_dataset() -> None:
    assert error_of([]) == f"{FILE}: has no rows"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            [{"instruction": "i", "output": "o"}, {"instruction": "i", "input": "x"}],
            "row 2: field 'output': missing (found: input, instruction)",
        ),
        ([{"instruction": "i", "output": 3}], "row 1: field 'output': must be a string, got int"),
        (
            [chat("user", "assistant"), chat("user", "bot")],
            "row 2: field 'messages[1].role': unknown role 'bot'; expected one of system, user, assistant",
        ),
        (
            [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": None}]}],
            "row 1: field 'messages[1].content': must be a string, got null",
        ),
        (
            [chat("user", "assistant", "user")],
            "row 1: field 'messages[2].role': is 'user'; the last turn must be 'assistant'",
        ),
        ([chat("system", "user")], "row 1: field 'messages': has no assistant turn"),
        (
            [chat("system", "assistant")],
            "row 1: field 'messages[1].role': is 'assistant'; the first non-system turn must be 'user'",
        ),
        (
            [{"messages": [{"from": "human", "value": "u"}]}],
            "row 1: field 'messages[0]': uses ShareGPT keys from/value; expected role/content",
        ),
        ([{"messages": "u: hi"}], "row 1: field 'messages': must be a non-empty list of {role, content} turns"),
    ],
)
def test_row_errors_name_file_row_and_field(rows: list[dict[str, Any]], expected: str) -> None:
    assert error_of(rows).startswith(f"{FILE}: {expected}")


def test_a_later_row_is_checked_against_the_detected_format() -> None:
    rows = [chat("user", "assistant"), chat("user", "assistant")]
    rows.append({"instruction": "i", "output": "o"})
    assert error_of(rows).startswith(f"{FILE}: row 3: field 'messages': missing")


def test_importing_formats_loads_no_ml_library() -> None:
    code = "import sys, lora_tune.data; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
