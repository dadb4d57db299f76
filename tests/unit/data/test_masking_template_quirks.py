"""Masking on the quirks real chat templates have (tests/e2e/test_real_templates.py checks the real ones): an EOS
written after the last message only (Phi-3.5), and refusals that name the built-in writing the same turns."""

from __future__ import annotations

import pytest

from lora_tune.data import IGNORE_INDEX, TemplateError, tokenize_conversation
from lora_tune.data.masking import closing_suffix, tokenize_rows
from lora_tune.quickstart.tiny import build_tokenizer

# Phi-3.5-mini-instruct's template, as its repository ships it: EOS closes a rendering without the generation prompt.
PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Gemma 2's: no system role, raises on one.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# ChatML that writes the last reply unlike earlier ones, with no thinking mode: not prefix-consistent, refused.
LAST_DIFFERS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
    "Answer: {% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# ChatML that drops earlier replies' reasoning, as Qwen3's does: earlier turns render differently once others follow.
DROPS_EARLIER = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
    "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three?"},
    {"role": "assistant", "content": "Five."},
]


@pytest.fixture
def tokenizer():
    tokenizer = build_tokenizer([m["content"] for m in CONVERSATION] * 20, vocab_size=300)
    specials = ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|eos|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


def trained(tokenizer, example) -> list[str]:
    runs, run = [], []
    for label in [*example.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    return runs


def test_eos_closing_the_conversation_is_not_part_of_the_last_turn(tokenizer) -> None:
    tokenizer.chat_template = PHI35
    tokenizer.eos_token = "<|eos|>"
    assert closing_suffix(tokenizer) == "<|eos|>"
    example = tokenize_conversation(CONVERSATION, tokenizer)
    assert trained(tokenizer, example) == ["Four.<|end|>", "Five.<|end|>"]
    eos = tokenizer.eos_token_id
    assert example.input_ids[-1] == eos and example.labels[-1] == IGNORE_INDEX and example.input_ids.count(eos) == 1


def test_a_prefix_consistent_template_closes_with_nothing(tokenizer) -> None:
    assert closing_suffix(tokenizer) == ""  # the tiny template: turns end with <|end|>, nothing after the last


def test_a_template_refusing_a_system_turn_names_the_builtin(tokenizer) -> None:
    tokenizer.chat_template = GEMMA2
    with pytest.raises(
        TemplateError, match=r"System role not supported; the built-in 'gemma' .*chat_template: gemma\)"
    ):
        tokenize_conversation(CONVERSATION, tokenizer)
    assert trained(tokenizer, tokenize_conversation(CONVERSATION[1:], tokenizer)) == [
        "Four.<end_of_turn>",
        "Five.<end_of_turn>",
    ]


def test_a_template_that_is_not_prefix_consistent_names_the_builtin(tokenizer) -> None:
    tokenizer.chat_template = LAST_DIFFERS
    with pytest.raises(TemplateError, match=r"not prefix-consistent.*\(model.chat_template: chatml\)$"):
        tokenize_conversation(CONVERSATION, tokenizer)


def test_a_thinking_template_that_drops_earlier_reasoning_trains_one_turn_a_row(tokenizer) -> None:
    """Each reply is trained after the prompt inference renders for it, earlier replies as the template writes them
    once others follow: one row per assistant turn (this refused as not prefix-consistent before)."""
    tokenizer.chat_template = DROPS_EARLIER
    with pytest.raises(TemplateError, match="2 training rows"):
        tokenize_conversation(CONVERSATION, tokenizer)
    first, second = tokenize_rows(CONVERSATION, tokenizer)
    assert trained(tokenizer, first) == ["<think>\n\n</think>\n\nFour.<|im_end|>"]
    assert trained(tokenizer, second) == ["<think>\n\n</think>\n\nFive.<|im_end|>"]
    start = next(i for i, lab in enumerate(second.labels) if lab != IGNORE_INDEX)
    prompt = tokenizer.decode(second.input_ids[:start])
    history = tokenizer.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == history and "Four." in prompt and "<think>" not in prompt


def test_no_builtin_is_named_when_it_cannot_render_the_conversation_either(tokenizer) -> None:
    tokenizer.chat_template = GEMMA2  # refuses the system turn; the gemma built-in has no place for a tool turn
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    messages = [
        CONVERSATION[0],
        CONVERSATION[1],
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        CONVERSATION[2],
    ]
    with pytest.raises(TemplateError) as caught:
        tokenize_conversation(messages, tokenizer)
    assert "System role not supported" in str(caught.value) and "built-in" not in str(caught.value)
