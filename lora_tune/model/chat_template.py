"""The tokenizer's chat template: the recipe's choice (built-in name, Jinja file or text) applied, and a pad token that
is not the end-of-turn token."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.data.masking import apply_template, recorded_thinking
from lora_tune.errors import ModelLoadError
from lora_tune.recipe.templates import BUILTIN_TEMPLATES, builtin_template, logger, looks_like_template_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# Tokens that some vocabularies reserve for padding; used before falling back to EOS.
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")


def apply_chat_template_choice(tokenizer: PreTrainedTokenizerBase, choice: str | None, source: str) -> None:
    """Set the recipe's `model.chat_template` (a built-in name, Jinja text or a .jinja file) on `tokenizer`.

    With no choice, the tokenizer's own template is kept; a tokenizer without one is an error naming the built-ins.
    A built-in whose end-of-turn marker is one token of the vocabulary makes that token the tokenizer's EOS (as TRL's
    `clone_chat_template` does), so "EOS ends every assistant turn" holds for the template actually used.
    """
    if choice is None:
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                f"model.chat_template: tokenizer of '{source}' has no chat template; set model.chat_template to a "
                f"built-in ({', '.join(BUILTIN_TEMPLATES)}), a Jinja string or a .jinja file"
            )
        return
    builtin = builtin_template(choice)
    if builtin is None:
        tokenizer.chat_template = _read_template(choice)
        return
    tokenizer.chat_template = builtin.source
    vocab = tokenizer.get_vocab()
    missing = [m for m in builtin.markers if m not in vocab]
    if missing:
        logger.warning(
            "model.chat_template: %s writes %s, which the tokenizer of '%s' splits into several tokens; the model "
            "must learn them from scratch (a template the base model knows is usually better)",
            builtin.name,
            ", ".join(missing),
            source,
        )
    if builtin.stop is not None and builtin.stop in vocab and tokenizer.eos_token != builtin.stop:
        logger.info("model.chat_template: %s ends assistant turns with %s, now EOS", builtin.name, builtin.stop)
        tokenizer.eos_token = builtin.stop


def generation_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], *, thinking: bool | None = None
) -> str:
    """The prompt text that asks the model for its next assistant turn: the one place inference renders it, so eval,
    generate, chat and serve present a conversation as training did (the same call as training's,
    `data.masking.apply_template`: a reply's `reasoning_content` goes inline for a template that does not read it).

    `thinking` is the template's `enable_thinking` (reasoning templates). None uses the setting the run trained with,
    recorded in the tokenizer saved with its adapter (`data.masking.record_thinking`), else the template's default.
    """
    if thinking is None:
        thinking = recorded_thinking(tokenizer)
    return apply_template(tokenizer, messages, add_generation_prompt=True, thinking=thinking)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token one, without adding tokens (that would resize the embeddings).

    Preference: UNK, then a token the vocabulary reserves for padding, then EOS. Pad = EOS is safe here because
    lora-tune's labels come from the assistant masks (TRL's collator pads labels with -100 separately), never from
    comparing ids with the pad id, so the EOS that closes each assistant turn stays trained.
    """
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, *_PAD_CANDIDATES]
    pad = next((t for t in candidates if t is not None and t in vocab and t != tokenizer.eos_token), None)
    tokenizer.pad_token = pad or tokenizer.eos_token


def _read_template(value: str) -> str:
    if value.endswith(".jinja"):
        path = Path(value)
        if not path.is_file():
            raise ModelLoadError(f"model.chat_template: file '{value}' not found")
        return path.read_text(encoding="utf-8")
    if looks_like_template_name(value):
        raise ModelLoadError(
            f"model.chat_template: unknown template '{value}'; built-ins: {', '.join(BUILTIN_TEMPLATES)} "
            "(or give Jinja text or a .jinja file)"
        )
    return value
