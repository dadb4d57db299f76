"""Format detection and conversion of every format (alpaca, messages, sharegpt, prompt/completion, text, mapped
columns) to the canonical form, and their errors."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from lora_tune.data import detect_format, normalize_rows
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig

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


def convert(row: dict[str, Any], fmt: str, **cfg: Any):
    from lora_tune.data.formats import map_columns, resolve_format, to_example
    from lora_tune.data.sources import Origin

    config = DatasetConfig(path=FILE, format=fmt, **cfg)
    mapped = map_columns(row, config.columns, Origin(FILE, 1))
    return to_example(mapped, resolve_format(config, mapped), Origin(FILE, 1), config.system_prompt)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"conversations": [{"from": "human", "value": "u"}]}, "sharegpt"),
        ({"conversations": [{"role": "user", "content": "u"}]}, "messages"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t", "id": 3}, "text"),
        ({"messages": [], "text": "rendered"}, "messages"),  # a rendered `text` column beside the turns
    ],
)
def test_detect_new_formats(row: dict[str, Any], expected: str) -> None:
    assert detect_format(row, file=FILE) == expected


def test_sharegpt_roles_and_aliases_become_canonical() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "u1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "u2"},
            {"from": "ChatGPT", "value": "a2"},
        ]
    }
    example = convert(row, "auto")
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("system", "s"),
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "u2"),
        ("assistant", "a2"),
    ]
    assert example.tools is None and example.text is None


def test_sharegpt_tool_calls_observations_and_tools_column() -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "weather?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'},
            {"from": "observation", "value": "21C"},
            {"from": "gpt", "value": "It is 21C."},
        ],
        "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]',
        "system": "Use tools.",
    }
    example = convert(row, "sharegpt")
    assert example.messages[0] == {"role": "system", "content": "Use tools."}
    assert example.messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }
    assert example.messages[3] == {"role": "tool", "content": "21C"}
    assert example.tools == [{"name": "get_weather", "parameters": {"type": "object"}}]


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        (
            [{"from": "human", "value": "u"}, {"from": "narrator", "value": "a"}],
            "field 'conversations[1].from': unknown speaker 'narrator'",
        ),
        (
            [{"from": "human", "value": "u"}, {"from": "gpt", "value": 1}],
            "field 'conversations[1].value': must be a string, got int",
        ),
        (
            [{"from": "human", "value": "u"}, {"from": "function_call", "value": "get_weather(Paris)"}],
            "field 'conversations[1].value': a function_call value must be JSON",
        ),
        (
            [{"from": "human", "value": "u"}, {"from": "observation", "value": "x"}, {"from": "gpt", "value": "a"}],
            "field 'conversations[1].role': is a tool result that follows no tool call",
        ),
    ],
)
def test_sharegpt_errors_name_the_turn(turns: list[dict[str, Any]], expected: str) -> None:
    assert error_of([{"conversations": turns}], format="sharegpt").startswith(f"{FILE}: row 1: {expected}")


def test_prompt_completion_strings_and_conversational_lists() -> None:
    example = convert({"prompt": "2+2?", "completion": "4"}, "auto", system_prompt="Be brief.")
    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    lists = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}
    assert convert(lists, "prompt_completion").messages[-1] == {"role": "assistant", "content": "yo"}
    assert error_of([{"prompt": "p"}], format="prompt_completion").startswith(
        f"{FILE}: row 1: field 'completion': missing (found: prompt)"
    )


def test_text_format_keeps_the_text_and_has_no_conversation() -> None:
    example = convert({"text": "Once upon a time."}, "auto")
    assert example.text == "Once upon a time." and example.messages == []
    assert error_of([{"text": "x"}], format="text").startswith(f"{FILE}: row 1: field 'text': the text format has no")


def test_column_mapping_renames_the_users_columns_to_a_formats_fields() -> None:
    row = {"question": "2+2?", "answer": "4", "id": 7}
    example = convert(row, "auto", columns={"instruction": "question", "output": "answer"})
    assert example.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    body = convert({"body": "Some prose."}, "text", columns={"text": "body"})
    assert body.text == "Some prose."


def test_column_mapping_to_a_missing_column_names_it() -> None:
    message = error_of([{"question": "q", "reply": "r"}], columns={"instruction": "question", "output": "answer"})
    assert message == (
        f"{FILE}: row 1: field 'answer': column 'answer' (columns.output) not found; the row has: question, reply"
    )


def test_messages_format_accepts_tool_turns() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    row = {
        "messages": [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "r"},
            {"role": "assistant", "content": "a"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    example = convert(row, "messages")
    assert example.messages[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert example.tools == [{"type": "function", "function": {"name": "f"}}]
