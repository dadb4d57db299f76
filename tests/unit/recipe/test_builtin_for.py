"""builtin_for: the built-in that writes a model's own template's turn format (named when lora-tune refuses one)."""

from __future__ import annotations

import pytest

from lora_tune.recipe.templates import BUILTIN_TEMPLATES, builtin_for


@pytest.mark.parametrize(
    "template, name",
    [
        ("{{ '<|start_header_id|>' + role + '<|end_header_id|>' }}", "llama-3"),
        ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "qwen"),
        ("{{ '<|im_start|>' + message.role }}{% if enable_thinking %}<think>{% endif %}", "chatml"),
        ("{{ '<start_of_turn>' + role }}", "gemma"),
        ("{{ '[INST]' + message['content'] + '[/INST]' }}", "mistral"),
        ("[INST] <<SYS>>\n{{ system }}\n<</SYS>>", "llama-2"),
    ],
)
def test_own_templates_map_to_the_builtin_of_their_format(template: str, name: str) -> None:
    builtin = builtin_for(template)
    assert builtin is not None and builtin.name == name


def test_nothing_to_suggest() -> None:
    assert builtin_for(None) is None and builtin_for("") is None
    assert builtin_for("{{ '<|user|>\n' + message['content'] + '<|end|>' }}") is None  # Phi: no built-in
    assert all(builtin_for(t.source) is None for t in BUILTIN_TEMPLATES.values())  # never itself
