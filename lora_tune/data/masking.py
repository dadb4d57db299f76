"""Tokenize a conversation with the tokenizer's chat template and train only on what the assistant says.

Works with any prefix-consistent chat template, with or without `{% generation %}` markers: the conversation is
rendered once, and each assistant turn is located as a character span by rendering prefixes of it. Assistant turn
`i` starts where `messages[:i]` rendered with the generation prompt ends, and ends where `messages[:i + 1]` ends
(so the end-of-turn marker is trained, and the model learns to stop), less trailing whitespace. The full text is
tokenized once with offsets, and a token is trained when its characters overlap an assistant span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_tune.data.formats import Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that do not contribute to the loss (what transformers' loss ignores)

Span = tuple[int, int]


class TemplateError(ValueError):
    """The chat template cannot render this conversation, or assistant turns cannot be located in its rendering."""


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one conversation and their labels: the id on trained tokens, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_with_spans(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[Span]]:
    """The conversation rendered by the chat template, and the [start, end) character span of each assistant turn."""
    text = _render(tokenizer, messages, add_generation_prompt=False)
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("the conversation starts with an assistant turn; a user turn must come first")
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(before):
            raise _not_a_prefix(i, " with the generation prompt")
        if not text.startswith(through):
            raise _not_a_prefix(i + 1, "")
        start, end = len(before), len(through.rstrip())
        spans.append((start, max(start, end)))
    return text, spans


def tokenize_conversation(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> TokenizedExample:
    """Token ids and labels of a canonical conversation; ids are cut to the first `max_length` when longer.

    Check `num_trained` on the result: truncation may leave no assistant token, and such an example teaches nothing.
    """
    text, spans = render_with_spans(messages, tokenizer)
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise TemplateError("assistant-only masking needs a fast tokenizer (one with offset mappings)") from e
    ids: list[int] = list(encoding["input_ids"])
    trained = _overlaps(encoding["offset_mapping"], spans)
    # The template usually writes BOS itself; when it does not but the tokenizer adds one by default, add it too.
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        ids, trained = [bos, *ids], [False, *trained]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, trained = ids[:max_length], trained[:max_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained, strict=True)]
    return TokenizedExample(input_ids=ids, labels=labels, truncated=truncated)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError as JinjaError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; set model.chat_template in the recipe")
    try:
        rendered = tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except JinjaError as e:  # templates raise on shapes they refuse, e.g. roles that do not alternate
        raise TemplateError(f"the chat template refused the conversation: {e}") from e
    if not isinstance(rendered, str):
        raise TemplateError(f"the chat template rendered {type(rendered).__name__}, expected text")
    return rendered


def _not_a_prefix(count: int, how: str) -> TemplateError:
    return TemplateError(
        f"the chat template is not prefix-consistent: the first {count} messages rendered{how} are not a prefix of "
        "the whole conversation, so assistant turns cannot be located; use a template that renders earlier turns "
        "the same whatever follows (model.chat_template)"
    )


def _overlaps(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """For each token's [start, end) characters, whether it overlaps one of the sorted, disjoint spans."""
    flags: list[bool] = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        flags.append(end > start and k < len(spans) and start < spans[k][1] and end > spans[k][0])
    return flags


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id
