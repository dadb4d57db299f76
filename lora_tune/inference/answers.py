"""Answers to chat prompts in batches, for evaluation, and the recipe's `eval:` section as generate() arguments.

`generate_answers` renders each conversation up to (not including) its final assistant turn with the tokenizer's
chat template, generates in left-padded batches (greedy unless the recipe's `eval:` section samples) until a stop
token (`model.stops`), and returns the decoded new text. `generation_kwargs` is the one place that spells the `eval:`
section as `generate()` arguments (also for `lora-tune generate`/`chat` and the server); `prompt_messages` and
`reference_answer` split a reference conversation into what is asked and what is expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lora_tune.model.chat_template import generation_prompt
from lora_tune.model.stops import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from lora_tune.recipe.schema import EvalConfig

Message = dict[str, str]


def prompt_messages(conversation: Sequence[Message]) -> list[Message]:
    """The conversation without its final assistant turn (if it ends with one): what the model is asked."""
    messages = list(conversation)
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return messages


def reference_answer(conversation: Sequence[Message]) -> str:
    """The content of the conversation's final assistant turn, the expected answer."""
    if not conversation or conversation[-1].get("role") != "assistant":
        raise ValueError("a reference conversation must end with an assistant turn")
    return conversation[-1]["content"]


def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[Message]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = True,
    settings: EvalConfig | None = None,
) -> list[str]:
    """Answers of `model` to each conversation, in order: greedy, or as `settings` (the recipe's `eval:`) say.

    A conversation that ends with an assistant turn is asked without it. Prompts are rendered with the chat
    template and `add_generation_prompt=True`, tokenized without extra special tokens (the template writes BOS
    itself), left-padded in batches; generation is greedy and stops at any of the model's stop tokens
    (`model.stops.stop_token_ids`: the template's end of turn, EOS, the generation config's). Only the new tokens
    are decoded, without special tokens, and stripped. The tokenizer's padding side and pad token are restored
    afterwards.
    """
    import torch
    from tqdm.auto import tqdm

    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise ValueError("nothing to stop at: no end-of-turn token in the chat template, no EOS token anywhere")
    if settings is not None:
        max_new_tokens, batch_size = settings.max_new_tokens, settings.batch_size
    extra = generation_kwargs(settings, stops)
    prompts = [generation_prompt(tokenizer, prompt_messages(conv)) for conv in conversations]
    padding_side, borrowed_pad = tokenizer.padding_side, tokenizer.pad_token is None
    tokenizer.padding_side = "left"
    if borrowed_pad:  # e.g. Llama 3: pad with EOS for the while; the attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(stops[0])
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc="generating", disable=not progress, unit="batch"):
            batch = tokenizer(
                prompts[start : start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                output = model.generate(
                    **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **extra
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            answers.extend(text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        if borrowed_pad:
            tokenizer.pad_token = None
        model.train(was_training)
    return answers


def generation_kwargs(settings: EvalConfig | None, eos_ids: list[int]) -> dict[str, object]:
    """The recipe's `eval:` section as `generate()` arguments, stopping at `eos_ids`: the one place that spells
    them."""
    if settings is None or not settings.do_sample:
        sampling: dict[str, object] = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p, "top_k": None}
    if settings is not None and not settings.stop_on_eos:
        # No EOS to stop at: every answer runs to max_new_tokens (e.g. to see what follows the end of turn).
        return {**sampling, "eos_token_id": None, "min_new_tokens": settings.max_new_tokens}
    return {**sampling, "eos_token_id": eos_ids}
