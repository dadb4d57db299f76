"""Reasoning data: reasoning_content and inline <think> blocks read into one form, rendered with data.thinking on
small templates that behave as the real reasoning templates do (tests/e2e/test_real_templates.py runs the real ones),
the enable_thinking a run records for inference, and one-line refusals."""

from __future__ import annotations

import pytest

from lora_tune.data import IGNORE_INDEX, TemplateError
from lora_tune.data.formats import split_reasoning, to_conversation
from lora_tune.data.masking import record_thinking, recorded_thinking, tokenize_rows
from lora_tune.data.pipeline import inference_thinking
from lora_tune.errors import DataError
from lora_tune.model.chat_template import generation_prompt
from lora_tune.quickstart.tiny import build_tokenizer

# DeepSeek-R1-Distill's shape: drops the reasoning of every reply, the last included; the prompt opens <think>
# (closed at once with thinking off, as llama.cpp's copy does).
R1_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<U>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}<A>{{ c }}<E>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<A><think>\n{% if not enable_thinking %}</think>{% endif %}{% endif %}"
)
# Qwen3's shape: reads reasoning_content, writes it for the last reply only; thinking off closes an empty block.
QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
    "<think>\n{{ m.reasoning_content | default('') }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
    "enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QUESTION, ANSWER, THOUGHT = "What is two plus two?", "Four.", "Two and two make four."
ONE = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}]
TWO = [
    *ONE,
    {"role": "user", "content": "And three?"},
    {"role": "assistant", "content": "Six.", "reasoning_content": "Doubled."},
]


@pytest.fixture
def tokenizer():
    corpus = [QUESTION, ANSWER, THOUGHT, "And three?", "Six.", "Doubled."] * 20
    tokenizer = build_tokenizer(corpus, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<U>", "<A>", "<E>", "<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
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


def prompt_before(tokenizer, example) -> str:
    start = max(i for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX and example.labels[i - 1] < 0)
    return tokenizer.decode(example.input_ids[:start])


def read(messages: list[dict]) -> list[dict]:
    return to_conversation({"messages": messages}, "messages", file="train.jsonl", row_number=4)


def test_inline_think_blocks_become_reasoning_content_in_every_format() -> None:
    inline = [ONE[0], {"role": "assistant", "content": f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"}]
    assert read(inline) == read(ONE) == ONE
    alpaca = to_conversation(
        {"instruction": QUESTION, "output": f"<think>{THOUGHT}</think>{ANSWER}"}, "alpaca", file="a.json", row_number=1
    )
    assert alpaca[-1] == {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}
    assert split_reasoning("<think>\n\n</think>\n\nFour.") == (None, "Four.")  # an empty block is no reasoning
    assert split_reasoning("I <think> not") == (None, "I <think> not")


@pytest.mark.parametrize(
    "turn, field, expected",
    [
        ({"role": "user", "content": "q", "reasoning_content": "x"}, "messages[0].reasoning_content", "user turn"),
        ({"role": "assistant", "content": "a", "reasoning_content": 3}, "messages[1].reasoning_content", "string"),
        (
            {"role": "assistant", "content": "<think>y</think>a", "reasoning_content": "x"},
            "messages[1].content",
            "reasoning twice",
        ),
    ],
)
def test_bad_reasoning_is_one_line_naming_file_row_and_field(turn, field, expected) -> None:
    messages = [turn, {"role": "assistant", "content": "a"}] if turn["role"] == "user" else [ONE[0], turn]
    with pytest.raises(DataError) as caught:
        read(messages)
    line = str(caught.value)
    assert line.startswith("train.jsonl: row 4:") and field in line and expected in line and "\n" not in line


def test_a_template_that_drops_the_reasoning_gets_it_back_after_its_thinking_prompt(tokenizer) -> None:
    tokenizer.chat_template = R1_LIKE
    [row] = tokenize_rows(ONE, tokenizer)
    assert trained(tokenizer, row) == [f"{THOUGHT}\n</think>\n\n{ANSWER}<E>"]
    assert prompt_before(tokenizer, row) == generation_prompt(tokenizer, ONE[:1], thinking=True)
    plain = [ONE[0], {"role": "assistant", "content": ANSWER}]
    [row] = tokenize_rows(plain, tokenizer)  # auto: no reasoning, thinking off; the prompt closes the block
    assert trained(tokenizer, row) == [f"\n\n{ANSWER}<E>"]
    assert prompt_before(tokenizer, row) == generation_prompt(tokenizer, ONE[:1], thinking=False)


def test_multi_turn_trains_each_reply_after_the_history_inference_sees(tokenizer) -> None:
    tokenizer.chat_template = R1_LIKE
    first, second = tokenize_rows(TWO, tokenizer)  # a row per turn: the template drops earlier reasoning
    assert trained(tokenizer, first) == [f"{THOUGHT}\n</think>\n\n{ANSWER}<E>"]
    assert trained(tokenizer, second) == ["Doubled.\n</think>\n\nSix.<E>"]
    history = prompt_before(tokenizer, second)
    assert history == generation_prompt(tokenizer, TWO[:3], thinking=True) and THOUGHT not in history


def test_a_template_reading_reasoning_content_trains_it_as_it_writes_it(tokenizer) -> None:
    tokenizer.chat_template = QWEN3_LIKE
    [row] = tokenize_rows(ONE, tokenizer)
    assert trained(tokenizer, row) == [f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}<|im_end|>"]
    [row] = tokenize_rows([ONE[0], {"role": "assistant", "content": ANSWER}], tokenizer)
    assert trained(tokenizer, row) == [f"{ANSWER}<|im_end|>"]  # off: the empty block is the prompt's
    [row] = tokenize_rows([ONE[0], {"role": "assistant", "content": ANSWER}], tokenizer, thinking="on")
    assert trained(tokenizer, row) == [f"<think>\n\n</think>\n\n{ANSWER}<|im_end|>"]


def test_reasoning_with_thinking_off_is_refused(tokenizer) -> None:
    tokenizer.chat_template = QWEN3_LIKE
    with pytest.raises(TemplateError, match=r"data.thinking is off.*set data.thinking: auto \(or on\)"):
        tokenize_rows(ONE, tokenizer, thinking="off")


def test_the_run_records_the_thinking_inference_uses(tokenizer, tmp_path) -> None:
    """auto: on when a training row has reasoning; the record is saved with the tokenizer and read back, and only for
    templates with the switch."""
    from transformers import AutoTokenizer

    from lora_tune.data.formats import Example

    assert inference_thinking("auto", [Example(ONE)]) is True
    assert inference_thinking("auto", [Example([ONE[0], {"role": "assistant", "content": ANSWER}])]) is False
    assert inference_thinking("on", []) is True and inference_thinking("off", [Example(ONE)]) is False
    tokenizer.chat_template = R1_LIKE
    assert generation_prompt(tokenizer, ONE[:1]).endswith("<think>\n</think>")  # the template's default: off
    record_thinking(tokenizer, True)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert recorded_thinking(reloaded) is True
    assert generation_prompt(reloaded, ONE[:1]) == generation_prompt(reloaded, ONE[:1], thinking=True)
    assert generation_prompt(reloaded, ONE[:1]).endswith("<think>\n")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.init_kwargs.pop("lora_tune_enable_thinking")
    record_thinking(tokenizer, True)
    assert recorded_thinking(tokenizer) is None  # no enable_thinking in the template: nothing to record
