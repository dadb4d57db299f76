"""Assistant-only masking: exactly the assistant contents and their end-of-turn markers are trained."""

from __future__ import annotations

import pytest
from tokenizers import processors

from lora_tune.data import IGNORE_INDEX, TemplateError, tokenize_conversation
from lora_tune.data.masking import render_with_spans
from lora_tune.quickstart.tiny import BOS, CHAT_TEMPLATE, build_tokenizer

CORPUS = ["You are terse.", "What is two plus two?", "Four.", "And three?", "Three plus two is five."] * 20
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three?"},
    {"role": "assistant", "content": "Three plus two is five."},
]


@pytest.fixture
def tokenizer():
    return build_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture
def chatml_tokenizer(tokenizer):
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])


def untrained_text(tokenizer, example) -> str:
    ids = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_only_assistant_turns_and_their_end_markers_are_trained(tokenizer) -> None:
    example = tokenize_conversation(CONVERSATION, tokenizer)
    assert trained_text(tokenizer, example) == "Four.<|end|>Three plus two is five.<|end|>"
    untrained = untrained_text(tokenizer, example)
    assert untrained == (
        "<|bos|><|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is two plus two?<|end|>\n<|assistant|>\n"
        "\n<|user|>\nAnd three?<|end|>\n<|assistant|>\n\n"
    )
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True))
    assert example.num_trained == sum(label != IGNORE_INDEX for label in example.labels) > 0
    assert not example.truncated


def test_agrees_with_transformers_generation_marker_mask(tokenizer) -> None:
    reference = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    example = tokenize_conversation(CONVERSATION, tokenizer)
    assert example.input_ids == list(reference["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in example.labels] == list(reference["assistant_masks"])


def test_spans_cover_assistant_content_and_end_marker(tokenizer) -> None:
    text, spans = render_with_spans(CONVERSATION, tokenizer)
    assert [text[start:end] for start, end in spans] == ["Four.<|end|>", "Three plus two is five.<|end|>"]


def test_plain_chatml_template_without_generation_markers(chatml_tokenizer) -> None:
    example = tokenize_conversation(CONVERSATION, chatml_tokenizer)
    assert trained_text(chatml_tokenizer, example) == "Four.<|im_end|>Three plus two is five.<|im_end|>"
    assert "What is two plus two?" in untrained_text(chatml_tokenizer, example)


def test_no_bos_is_added_when_the_tokenizer_adds_it_but_the_template_does_not(chatml_tokenizer) -> None:
    # Inference tokenizes the rendered prompt without special tokens: a BOS added here would be training-only.
    bos = chatml_tokenizer.bos_token_id
    chatml_tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos)]
    )
    example = tokenize_conversation(CONVERSATION, chatml_tokenizer)
    prompt = chatml_tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True)
    assert bos not in example.input_ids
    assert example.input_ids[: len(prompt["input_ids"])] == list(prompt["input_ids"])
    assert trained_text(chatml_tokenizer, example) == "Four.<|im_end|>Three plus two is five.<|im_end|>"


def test_bos_written_by_the_template_is_not_doubled(tokenizer) -> None:
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos)]
    )
    example = tokenize_conversation(CONVERSATION, tokenizer)
    assert example.input_ids[0] == bos and example.input_ids[1] != bos


def test_truncation_keeps_the_start(tokenizer) -> None:
    full = tokenize_conversation(CONVERSATION, tokenizer)
    cut_at = len(full.input_ids) - 3  # inside the last assistant turn: its end marker is cut off
    example = tokenize_conversation(CONVERSATION, tokenizer, max_length=cut_at)
    assert example.truncated
    assert example.input_ids == full.input_ids[:cut_at] and example.labels == full.labels[:cut_at]
    assert 0 < example.num_trained < full.num_trained
    assert not tokenize_conversation(CONVERSATION, tokenizer, max_length=len(full.input_ids)).truncated


def test_truncation_can_remove_every_trained_token(tokenizer) -> None:
    full = tokenize_conversation(CONVERSATION, tokenizer)
    first_trained = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    example = tokenize_conversation(CONVERSATION, tokenizer, max_length=first_trained)
    assert example.truncated and example.num_trained == 0 and len(example.input_ids) == first_trained


def test_template_that_is_not_prefix_consistent_is_refused(tokenizer) -> None:
    tokenizer.chat_template = "{{ messages | length }}" + CHAT_TEMPLATE
    with pytest.raises(TemplateError, match="not prefix-consistent: the first 2 messages rendered with the gen"):
        tokenize_conversation(CONVERSATION, tokenizer)


def test_template_that_refuses_the_conversation(tokenizer) -> None:
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(TemplateError, match="the chat template refused the conversation: roles must alternate"):
        tokenize_conversation(CONVERSATION, tokenizer)


def test_tokenizer_without_chat_template(tokenizer) -> None:
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template; set model.chat_template"):
        tokenize_conversation(CONVERSATION, tokenizer)


CONVERSATIONS = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[:3], CONVERSATION[1:]] * 3  # 12: the batched path


def test_batched_tokenization_equals_one_at_a_time(tokenizer) -> None:
    from lora_tune.data.masking import tokenize_batch

    one_by_one = [tokenize_conversation(c, tokenizer, 40) for c in CONVERSATIONS]
    assert tokenize_batch(CONVERSATIONS, tokenizer, 40) == one_by_one
    assert any(e.truncated for e in one_by_one) and not all(e.truncated for e in one_by_one)


def test_batched_path_falls_back_when_generation_markers_leave_out_the_end_marker(tokenizer) -> None:
    """A template whose {% generation %} block stops before <|end|>: the end marker must still be trained."""
    from lora_tune.data.masking import tokenize_batch

    tokenizer.chat_template = CHAT_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|end|>' }}",
    )
    examples = tokenize_batch(CONVERSATIONS, tokenizer)
    assert trained_text(tokenizer, examples[0]) == "Four.<|end|>Three plus two is five.<|end|>"
    assert examples == [tokenize_conversation(c, tokenizer) for c in CONVERSATIONS]


def test_tokenize_dataset_in_two_processes_with_a_tools_column(chatml_tokenizer) -> None:
    import json

    from datasets import Dataset

    from lora_tune.data.masking import tokenize_dataset
    from lora_tune.recipe.templates import BUILTIN_TEMPLATES

    chatml_tokenizer.chat_template = BUILTIN_TEMPLATES["chatml"].source
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    rows = {"messages": CONVERSATIONS, "tools": [json.dumps(tools) if i % 2 else None for i in range(12)]}
    result = tokenize_dataset(Dataset.from_dict(rows), chatml_tokenizer, 512, num_proc=2, batch_size=6)
    assert result.column_names == ["input_ids", "labels", "truncated", "num_trained", "piece"]
    for i, conversation in enumerate(CONVERSATIONS):
        expected = tokenize_conversation(conversation, chatml_tokenizer, 512, tools=tools if i % 2 else None)
        assert result[i]["input_ids"] == expected.input_ids and result[i]["labels"] == expected.labels
    assert "add" in chatml_tokenizer.decode(result[1]["input_ids"]) and "add" not in chatml_tokenizer.decode(
        result[0]["input_ids"]
    )


def test_full_sequence_loss(tokenizer) -> None:
    example = tokenize_conversation(CONVERSATION, tokenizer, train_on="all")
    assert example.labels == example.input_ids == tokenize_conversation(CONVERSATION, tokenizer).input_ids


def test_batch_errors_name_the_conversation(tokenizer) -> None:
    from lora_tune.data.masking import tokenize_batch

    bad = [{"role": "assistant", "content": "Four."}]
    with pytest.raises(TemplateError, match="starts with an assistant turn") as caught:
        tokenize_batch([CONVERSATION, CONVERSATION, bad], tokenizer)
    assert caught.value.index == 2


def test_overlaps_matches_a_brute_force_check() -> None:
    import random

    from lora_tune.data.masking import _overlaps

    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 60), 12))
        offsets = [(a, b) for a, b in zip([0, *cuts], cuts, strict=False)] + [(cuts[-1], cuts[-1])]  # + empty token
        marks = sorted(rng.sample(range(0, 64), 4))
        spans = [(marks[0], marks[1]), (marks[2], marks[3])]
        expected = [b > a and any(b > lo and a < hi for lo, hi in spans) for a, b in offsets]
        assert _overlaps(offsets, spans) == expected


# A ShareGPT tool-calling row as public tool-use datasets ship it (glaive / LLaMA-Factory style).
SHAREGPT_TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temperature": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": '[{"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object"}}]',
}


@pytest.mark.parametrize("template", ["chatml", "qwen", "llama-3"])
def test_sharegpt_tool_turns_train_the_call_and_answer_never_the_tool_output(template: str) -> None:
    from lora_tune.data.formats import to_example
    from lora_tune.data.sources import Origin
    from lora_tune.model.chat_template import apply_chat_template_choice
    from lora_tune.recipe.templates import BUILTIN_TEMPLATES

    example = to_example(SHAREGPT_TOOL_ROW, "sharegpt", Origin("tools.jsonl", 1))
    tokenizer = build_tokenizer(CORPUS + ["weather Paris degrees temperature get_weather city"] * 20, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": list(BUILTIN_TEMPLATES[template].markers)})
    apply_chat_template_choice(tokenizer, template, "test")
    tokenized = tokenize_conversation(example.messages, tokenizer, tools=example.tools)
    trained, untrained = trained_text(tokenizer, tokenized), untrained_text(tokenizer, tokenized)
    stop = BUILTIN_TEMPLATES[template].stop
    # The call (name and arguments) and the final answer are trained, each with its end-of-turn marker ...
    assert '"get_weather"' in trained and '"Paris"' in trained
    assert trained.endswith(f"It is 21 degrees in Paris.{stop}")
    assert trained.count(stop) == 2
    # ... the tool's output, the user's question and the tool definitions are not.
    assert '{"temperature": 21}' in untrained and "temperature" not in trained
    assert "What is the weather" in untrained and "Weather of a city" in untrained


def test_text_examples_train_every_token_and_end_with_eos(tokenizer) -> None:
    from lora_tune.data.masking import tokenize_texts

    [[plain]] = tokenize_texts(["Four. Three plus two is five."], tokenizer)
    assert plain.input_ids[0] != tokenizer.bos_token_id  # this tokenizer adds no BOS by default
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos)]
    )
    [[example]] = tokenize_texts(["Four. Three plus two is five."], tokenizer)
    assert example.input_ids == [bos, *plain.input_ids]  # BOS once, when the tokenizer adds one
    assert example.labels == example.input_ids and example.num_trained == len(example.input_ids)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids[1:-1]) == "Four. Three plus two is five."
    assert "<|user|>" not in tokenizer.decode(example.input_ids)  # no chat template


def test_a_text_longer_than_max_length_is_cut_into_pieces_that_keep_every_token(tokenizer) -> None:
    """Continued pretraining: a long document is all trained, in max_length pieces, never truncated to its start."""
    from lora_tune.data.masking import tokenize_texts

    document = "Four. Three plus two is five. And three? " * 3
    [[whole]] = tokenize_texts([document], tokenizer)
    assert len(whole.input_ids) == 43  # cut below into 5 x 8 + 3 tokens
    [pieces, [short]] = tokenize_texts([document, "Four."], tokenizer, max_length=8)
    assert [len(p.input_ids) for p in pieces] == [8, 8, 8, 8, 8, 3]
    assert [t for p in pieces for t in p.input_ids] == whole.input_ids  # no token lost, none added (no BOS)
    assert all(p.labels == p.input_ids and not p.truncated for p in pieces)
    assert pieces[-1].input_ids[-1] == tokenizer.eos_token_id  # the document's end is still learnt
    assert short.input_ids[-1] == tokenizer.eos_token_id and len(short.input_ids) < 8
    [[exact]] = tokenize_texts([document], tokenizer, max_length=43)  # exactly max_length: one row
    assert exact.input_ids == whole.input_ids


def test_tokenize_dataset_gives_each_piece_its_own_row_in_order(chatml_tokenizer) -> None:
    """Pieces follow their text, chat rows are truncated as before, across batches and worker processes."""
    import json

    from datasets import Dataset

    from lora_tune.data.masking import tokenize_dataset, tokenize_texts

    document = "Four. Three plus two is five. And three? " * 3
    texts = [document if i % 3 == 0 else None for i in range(12)]  # 4 long texts among 8 conversations
    messages = [json.dumps([] if t else CONVERSATIONS[i]) for i, t in enumerate(texts)]  # as the pipeline writes
    rows = {"messages": messages, "text": texts}
    result = tokenize_dataset(Dataset.from_dict(rows), chatml_tokenizer, 8, num_proc=2, batch_size=5)
    [pieces] = tokenize_texts([document], chatml_tokenizer, 8)
    expected: list[tuple[list[int], int]] = []
    for i, text in enumerate(texts):
        if text:
            expected += [(p.input_ids, n) for n, p in enumerate(pieces)]
        else:
            expected.append((tokenize_conversation(CONVERSATIONS[i], chatml_tokenizer, 8).input_ids, 0))
    assert list(zip(result["input_ids"], result["piece"], strict=True)) == expected
    assert len(result) == 8 + 4 * 6 and result["truncated"].count(True) == 8  # conversations cut, texts never
