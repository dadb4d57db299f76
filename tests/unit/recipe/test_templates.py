"""Built-in chat templates: exactly the assistant turns and their end markers are trained, for every template."""

from __future__ import annotations

import json

import pytest
from tokenizers import processors

from lora_tune.data import IGNORE_INDEX, tokenize_conversation
from lora_tune.errors import LoraTuneError
from lora_tune.model.chat_template import apply_chat_template_choice, ensure_pad_token
from lora_tune.quickstart.tiny import BOS, build_tokenizer
from lora_tune.recipe.schema import ModelConfig
from lora_tune.recipe.templates import BUILTIN_TEMPLATES, builtin_template

MARKERS = sorted({m for t in BUILTIN_TEMPLATES.values() for m in t.markers})
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three?"},
    {"role": "assistant", "content": "Three plus two is five."},
]
PROMPT_TEXTS = ("You are terse.", "What is two plus two?", "And three?")
CORPUS = [m["content"] for m in CONVERSATION] * 20


def make_tokenizer(template: str, *, adds_bos: bool = False):
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    if adds_bos:  # like Llama tokenizers: BOS added by default when encoding text
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.bos_token_id)]
        )
    apply_chat_template_choice(tokenizer, template, "test")
    return tokenizer


def trained_runs(example) -> list[list[int]]:
    """The runs of consecutive trained tokens: one per assistant turn."""
    runs: list[list[int]] = []
    previous = False
    for label in example.labels:
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(label)
        previous = trained
    return runs


def expected_turn(name: str, content: str, tokenizer) -> str:
    if name == "llama-2":  # "[/INST] answer </s>": the space before the answer is fused into its first token
        return f" {content} {tokenizer.eos_token}"
    return content + tokenizer.eos_token


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("adds_bos", [False, True], ids=["no-bos", "tokenizer-adds-bos"])
def test_trained_tokens_are_exactly_the_assistant_turns(name: str, adds_bos: bool) -> None:
    tokenizer = make_tokenizer(name, adds_bos=adds_bos)
    example = tokenize_conversation(CONVERSATION, tokenizer)
    runs = trained_runs(example)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    # One run per assistant turn, decoding to its content and the end-of-turn marker, and nothing else.
    assert [tokenizer.decode(run) for run in runs] == [expected_turn(name, a, tokenizer) for a in answers]
    # EOS (the template's end-of-turn marker, made the tokenizer's EOS) ends every assistant turn.
    stop = BUILTIN_TEMPLATES[name].stop
    assert tokenizer.eos_token == (stop or "<|end|>")
    assert all(run[-1] == tokenizer.eos_token_id for run in runs)
    untrained = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab < 0])
    assert all(text in untrained for text in PROMPT_TEXTS)
    # BOS: never twice in a row; first when the format has one, else absent whether or not the tokenizer adds one
    # (inference tokenizes the rendered prompt without special tokens).
    bos = tokenizer.bos_token_id
    assert example.input_ids[:2] != [bos, bos]
    if "bos_token" in BUILTIN_TEMPLATES[name].source:
        assert example.input_ids[0] == bos and example.labels[0] == IGNORE_INDEX
    else:
        assert bos not in example.input_ids


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_generation_markers_agree_with_transformers_assistant_masks(name: str) -> None:
    tokenizer = make_tokenizer(name)
    reference = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    example = tokenize_conversation(CONVERSATION, tokenizer)
    assert example.input_ids == list(reference["input_ids"])
    assert [int(label != IGNORE_INDEX) for label in example.labels] == list(reference["assistant_masks"])


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_full_sequence_loss_trains_every_token(name: str) -> None:
    tokenizer = make_tokenizer(name, adds_bos=True)
    example = tokenize_conversation(CONVERSATION, tokenizer, train_on="all")
    assert example.labels == example.input_ids
    assert example.input_ids == tokenize_conversation(CONVERSATION, tokenizer).input_ids


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "What is two plus two?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}],
    },
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "Four."},
]


@pytest.mark.parametrize("name", ["chatml", "qwen", "llama-3"])
def test_tool_calls_are_trained_and_tool_results_and_definitions_are_not(name: str) -> None:
    tokenizer = make_tokenizer(name)
    example = tokenize_conversation(TOOL_CONVERSATION, tokenizer, tools=TOOLS)
    runs = [tokenizer.decode(run) for run in trained_runs(example)]
    arguments = "parameters" if name == "llama-3" else "arguments"
    assert runs[0].endswith(
        f'{{"name": "add", "{arguments}": {{"a": 2, "b": 2}}}}'
        + ("\n</tool_call>" if name != "llama-3" else "")
        + tokenizer.eos_token
    )
    assert runs[1] == "Four." + tokenizer.eos_token and len(runs) == 2
    untrained = tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab < 0])
    assert json.dumps(TOOLS[0]["function"]["name"]) in untrained  # the tool definitions are in the prompt
    assert "4" in untrained


def test_names_are_case_insensitive_with_aliases() -> None:
    assert builtin_template("Llama3") is BUILTIN_TEMPLATES["llama-3"]
    assert builtin_template("ChatML") is BUILTIN_TEMPLATES["chatml"]
    assert builtin_template("vicuna") is None


def test_unknown_name_is_a_recipe_error_at_validate_time() -> None:
    with pytest.raises(ValueError, match="unknown template 'chatm'; built-ins: chatml, qwen, llama-3"):
        ModelConfig(name="m", chat_template="chatm")
    assert ModelConfig(name="m", chat_template="{{ messages }}").chat_template == "{{ messages }}"


def test_no_template_and_none_named_is_a_clear_error() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    tokenizer.chat_template = None
    with pytest.raises(LoraTuneError, match="has no chat template; set model.chat_template to a built-in \\(chatml"):
        apply_chat_template_choice(tokenizer, None, "my-model")
    apply_chat_template_choice(tokenizer, "alpaca", "my-model")
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["alpaca"].source


def test_tokenizer_template_is_kept_when_none_is_named() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    own = tokenizer.chat_template
    apply_chat_template_choice(tokenizer, None, "m")
    assert tokenizer.chat_template == own


def test_pad_token_prefers_a_reserved_token_over_eos() -> None:
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)  # has <|pad|> in its vocabulary
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("padding_free", [False, True])
def test_pad_equal_to_eos_keeps_eos_in_the_labels(padding_free: bool) -> None:
    """No pad-like token: pad becomes EOS, and TRL's collator still trains every end-of-turn EOS."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = make_tokenizer("chatml")
    tokenizer.pad_token = None
    vocab_without_pad = {t for t in tokenizer.get_vocab() if t != "<|pad|>"}
    tokenizer.get_vocab = lambda: dict.fromkeys(vocab_without_pad, 0)  # as if the vocabulary had no pad token
    ensure_pad_token(tokenizer)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    short = tokenize_conversation(CONVERSATION[:3], tokenizer)
    long = tokenize_conversation(CONVERSATION, tokenizer)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    labels = batch["labels"].flatten().tolist()
    ids = batch["input_ids"].flatten().tolist()
    trained_eos = sum(1 for t, lab in zip(ids, labels, strict=True) if t == eos and lab == eos)
    assert trained_eos == 3  # one per assistant turn: 1 in the short example, 2 in the long one
    if not padding_free:
        assert ids.count(eos) > 3  # the padding is EOS too, and is not trained
