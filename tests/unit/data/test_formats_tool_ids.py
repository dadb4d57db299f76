"""Tool-call ids survive the messages format: Mistral's own template pairs each tool result with its call by id."""

from __future__ import annotations

from lora_tune.data.formats import to_example
from lora_tune.data.sources import Origin

ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call00001", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call00001", "content": "21"},
        {"role": "assistant", "content": "21 degrees."},
    ]
}


def test_call_ids_and_tool_call_ids_are_kept() -> None:
    example = to_example(ROW, "messages", Origin("data.jsonl", 1), None)
    call = example.messages[1]["tool_calls"][0]
    assert call == {"id": "call00001", "type": "function", "function": {"name": "w", "arguments": {}}}
    assert example.messages[2]["tool_call_id"] == "call00001"
    assert "tool_call_id" not in example.messages[0] and "id" not in example.messages[3]
