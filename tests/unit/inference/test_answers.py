"""Exact match and its normalisation; greedy batched generation on a tiny local model, and where it stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.evaluate.scores import exact_match, normalize_answer, normalized_exact_match
from lora_tune.inference.answers import generate_answers, prompt_messages, reference_answer


def test_exact_match_counts_identical_strings_only() -> None:
    assert exact_match(["Paris", "Rome", "oslo"], ["Paris", "Bern", "Oslo"]) == pytest.approx(1 / 3)
    assert exact_match(["Paris "], ["Paris"]) == 0.0
    assert exact_match([], []) == 0.0


def test_exact_match_refuses_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("  Paris.  ", "paris"),
        ("New   York!", "new york"),
        ("new\tyork ?!", "new york"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # casefold, not lower
        ("3.14", "3.14"),  # only trailing punctuation goes
        ("...", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalized_exact_match_forgives_case_space_and_trailing_punctuation() -> None:
    predictions = ["paris.", " Rome ", "Bern", "Oslo city"]
    references = ["Paris", "Rome", "bern!", "Oslo"]
    assert exact_match(predictions, references) == 0.0
    assert normalized_exact_match(predictions, references) == 0.75


def test_prompt_and_reference_of_a_conversation() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    assert prompt_messages(conversation) == conversation[:2]
    assert prompt_messages(conversation[:2]) == conversation[:2]
    assert reference_answer(conversation) == "Paris"
    with pytest.raises(ValueError):
        reference_answer(conversation[:2])


@pytest.fixture(scope="module")
def peaked_model(tiny_model_dir: Path):
    """The tiny random model with a sharpened output layer: greedy choices are not near-ties."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


QUESTIONS = [
    [{"role": "user", "content": "what is the colour of the sky?"}, {"role": "assistant", "content": "blue"}],
    [{"role": "user", "content": "name a fruit"}],
    [{"role": "system", "content": "count"}, {"role": "user", "content": "one two three four five six seven"}],
    [{"role": "user", "content": "numbers 0 1 2"}, {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog, then what?"}],
]


def test_generate_answers_batched_with_left_padding_equals_one_by_one(peaked_model) -> None:
    model, tokenizer = peaked_model
    tokenizer.padding_side = "right"
    batched = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=6, batch_size=8, progress=False)
    single = [generate_answers(model, tokenizer, [q], max_new_tokens=6, progress=False)[0] for q in QUESTIONS]
    assert all(isinstance(answer, str) for answer in batched)
    assert batched == single
    assert len(set(batched)) > 1  # the answers depend on the prompt
    assert tokenizer.padding_side == "right"  # restored


def test_generate_answers_decodes_only_the_new_tokens_of_the_chat_prompt(peaked_model) -> None:
    import torch

    model, tokenizer = peaked_model
    (answer,) = generate_answers(model, tokenizer, QUESTIONS[:1], max_new_tokens=4, progress=False)
    prompt = tokenizer.apply_chat_template(QUESTIONS[0][:1], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith(tokenizer.bos_token) and prompt.endswith("<|assistant|>\n")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert (ids[0] == tokenizer.bos_token_id).sum() == 1  # the template's BOS only
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    assert answer == tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_generate_answers_borrows_eos_when_there_is_no_pad_token(peaked_model) -> None:
    model, tokenizer = peaked_model
    expected = generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=3, progress=False)
    pad = tokenizer.pad_token
    tokenizer.pad_token = None
    try:
        assert generate_answers(model, tokenizer, QUESTIONS, max_new_tokens=3, progress=False) == expected
        assert tokenizer.pad_token is None
    finally:
        tokenizer.pad_token = pad


def test_generation_stops_at_the_templates_end_of_turn_even_when_the_configs_name_another_eos(peaked_model) -> None:
    """A base whose tokenizer and generation config name their own EOS (a base, not instruct, checkpoint), with a
    template that closes each answer with another special token: answers end at that token, as in the GGUF export."""
    model, tokenizer = peaked_model
    end_of_turn, base_eos = tokenizer.convert_tokens_to_ids(["<|end|>", "<|system|>"])
    asked: list[object] = []
    generate = model.generate

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        asked.append(kwargs["eos_token_id"])
        return generate(*args, **kwargs)

    eos, configured = tokenizer.eos_token, model.generation_config.eos_token_id
    tokenizer.eos_token, model.generation_config.eos_token_id = "<|system|>", base_eos
    model.generate = recording
    try:
        generate_answers(model, tokenizer, QUESTIONS[:1], max_new_tokens=2, progress=False)
    finally:
        tokenizer.eos_token, model.generation_config.eos_token_id = eos, configured
        del model.generate
    assert asked == [[end_of_turn, base_eos]]


def test_generation_kwargs_follow_the_eval_section() -> None:
    from lora_tune.inference.answers import generation_kwargs
    from lora_tune.recipe.schema import EvalConfig

    greedy = generation_kwargs(EvalConfig(), [7])
    assert greedy == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None, "eos_token_id": [7]}
    sampled = generation_kwargs(EvalConfig(do_sample=True, temperature=0.7, top_p=0.9), [7, 9])
    assert sampled == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": None, "eos_token_id": [7, 9]}
    no_stop = generation_kwargs(EvalConfig(stop_on_eos=False, max_new_tokens=5), [7])
    assert no_stop["eos_token_id"] is None and no_stop["min_new_tokens"] == 5


def test_generate_answers_uses_the_eval_settings(peaked_model) -> None:
    import torch

    from lora_tune.recipe.schema import EvalConfig

    model, tokenizer = peaked_model
    questions = QUESTIONS[:3]

    def answers(**settings) -> list[str]:
        return generate_answers(model, tokenizer, questions, settings=EvalConfig(**settings), progress=False)

    assert answers(max_new_tokens=2) == answers(max_new_tokens=2, batch_size=1)
    # stop_on_eos: false runs every answer to max_new_tokens.
    for answer in answers(max_new_tokens=5, stop_on_eos=False):
        assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= 3  # 5 new tokens, some merged
    # Sampling at a high temperature follows the seed and differs from greedy.
    torch.manual_seed(0)
    first = answers(do_sample=True, temperature=5.0, max_new_tokens=4)
    torch.manual_seed(0)
    assert answers(do_sample=True, temperature=5.0, max_new_tokens=4) == first
    assert first != answers(max_new_tokens=4)


def test_reference_nll_is_the_assistant_token_loss(peaked_model) -> None:
    import torch

    from lora_tune.data.masking import tokenize_conversation
    from lora_tune.evaluate.scores import reference_nll

    model, tokenizer = peaked_model
    answered = [q for q in QUESTIONS if q[-1]["role"] == "assistant"]
    total, tokens = reference_nll(model, tokenizer, answered, batch_size=2)
    expected_total, expected_tokens = 0.0, 0
    for conversation in answered:  # one at a time, unpadded: transformers' own mean loss times the token count
        example = tokenize_conversation(conversation, tokenizer)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]))
        expected_total += out.loss.item() * (example.num_trained - (example.labels[0] != -100))
        expected_tokens += example.num_trained
    assert tokens == expected_tokens > 0
    assert total == pytest.approx(expected_total, rel=1e-4)
