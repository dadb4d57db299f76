"""Tokenize a conversation with the tokenizer's chat template and train only on what the assistant says.

Works with any prefix-consistent chat template, with or without `{% generation %}` markers: the conversation is
rendered once, and each assistant turn is located as a character span by rendering prefixes of it. Assistant turn
`i` starts where `messages[:i]` rendered with the generation prompt ends, and ends where `messages[:i + 1]` ends
(so the end-of-turn marker is trained, and the model learns to stop), less trailing whitespace. The full text is
tokenized once with offsets, and a token is trained when its characters overlap an assistant span.

`train_on="all"` trains every token instead (full-sequence loss). `tokenize_batch` renders many conversations and
tokenizes them in one call of the fast (Rust) tokenizer; `tokenize_dataset` runs it through `datasets.map`
(batched, `num_proc` workers, cached by `datasets` when the dataset is backed by files).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lora_tune.data.formats import Message
from lora_tune.recipe.templates import builtin_for

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that do not contribute to the loss (what transformers' loss ignores)

Span = tuple[int, int]
TrainOn = Literal["assistant", "all"]
Tools = Sequence[Mapping[str, Any]] | None


class TemplateError(ValueError):
    """The chat template cannot render this conversation, or assistant turns cannot be located in its rendering.

    `index` is the conversation's position in the batch given to `tokenize_batch` (None for a single one).
    """

    index: int | None = None


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one conversation and their labels: the id on trained tokens, IGNORE_INDEX elsewhere."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def render_with_spans(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, tools: Tools = None
) -> tuple[str, list[Span]]:
    """The conversation rendered by the chat template, and the [start, end) character span of each assistant turn."""
    messages = [_plain(m) for m in messages]
    text = _render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    closing = closing_suffix(tokenizer)
    spans: list[Span] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("the conversation starts with an assistant turn; a user turn must come first")
        before = _render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        if closing and through.endswith(closing):  # written after the last message only: not part of this turn
            through = through[: -len(closing)]
        if not text.startswith(before):
            raise _not_a_prefix(i, " with the generation prompt", _builtin_hint(tokenizer, messages, tools))
        if not text.startswith(through):
            raise _not_a_prefix(i + 1, "", _builtin_hint(tokenizer, messages, tools))
        start, end = len(before), len(through.rstrip())
        spans.append((start, max(start, end)))
    return text, spans


def tokenize_conversation(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    train_on: TrainOn = "assistant",
    tools: Tools = None,
) -> TokenizedExample:
    """Token ids and labels of a canonical conversation; ids are cut to the first `max_length` when longer.

    Check `num_trained` on the result: truncation may leave no assistant token, and such an example teaches nothing.
    """
    return tokenize_batch([messages], tokenizer, max_length, train_on=train_on, tools=[tools])[0]


def tokenize_batch(
    conversations: Sequence[Sequence[Message]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    train_on: TrainOn = "assistant",
    tools: Sequence[Tools] | None = None,
) -> list[TokenizedExample]:
    """`tokenize_conversation` for many conversations, with one batched call of the fast tokenizer.

    `tools[i]` (optional) is the tool list of conversation i, passed to the chat template as `tools=`. Raises
    `TemplateError` for the first conversation the template cannot render or mask.
    """
    if not conversations:
        return []
    tool_lists = list(tools) if tools is not None else [None] * len(conversations)
    # One rendering per conversation pays off once the few cross-checks of `_render_marked` are amortised.
    rendered = _render_marked(conversations, tokenizer, tool_lists) if len(conversations) >= 8 else None
    if rendered is None:
        rendered = []
        for i, (messages, tool_list) in enumerate(zip(conversations, tool_lists, strict=True)):
            try:
                rendered.append(render_with_spans(messages, tokenizer, tool_list))
            except TemplateError as e:
                e.index = i if len(conversations) > 1 else None  # lets the caller name the row
                raise
    try:
        encoding = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise TemplateError("assistant-only masking needs a fast tokenizer (one with offset mappings)") from e
    # No BOS beyond what the template writes: inference renders the prompt with the same template and tokenizes it
    # without special tokens (as apply_chat_template(tokenize=True) does), so a BOS added here would be seen in
    # training only (Phi-3.5's template writes none while its tokenizer adds one by default).
    return [
        _example(list(ids), offsets, spans, max_length, train_on)
        for ids, offsets, (_, spans) in zip(encoding["input_ids"], encoding["offset_mapping"], rendered, strict=True)
    ]


def tokenize_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int | None = None
) -> list[list[TokenizedExample]]:
    """Plain texts (the text format: continued pretraining), each as its pieces of at most `max_length` tokens.

    A text is tokenized with BOS (when the tokenizer adds one) and EOS appended, so the model learns where a document
    ends; every token is trained and no chat template is used. A text longer than `max_length` is cut into
    consecutive pieces (the last one shorter), each a training row, as LLaMA-Factory's pretrain stage and TRL's
    wrapped packing cut documents: continued pretraining learns from all of a document, not from its first
    `max_length` tokens. Pieces carry no extra BOS, so their tokens are exactly the document's."""
    if not texts:
        return []
    encoding = tokenizer(list(texts), add_special_tokens=False)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None and _adds_bos(tokenizer) else []
    suffix = [eos] if eos is not None else []
    return [_pieces([*prefix, *ids, *suffix], max_length) for ids in encoding["input_ids"]]


def _pieces(ids: list[int], max_length: int | None) -> list[TokenizedExample]:
    if max_length is None or len(ids) <= max_length:
        return [TokenizedExample(input_ids=ids, labels=list(ids))]
    cuts = range(0, len(ids), max_length)
    return [TokenizedExample(input_ids=ids[i : i + max_length], labels=ids[i : i + max_length]) for i in cuts]


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    train_on: TrainOn = "assistant",
    num_proc: int | None = None,
    batch_size: int = 1000,
    cache_file_name: str | None = None,
) -> Dataset:
    """Map a dataset with a `messages` column (a list of turns or its JSON text; optionally `tools`, a list or its
    JSON text, and `text`: rows whose text is not null are plain text) to tokenized columns.

    Adds `input_ids`, `labels`, `truncated`, `num_trained` and `piece` and removes the other columns. A plain-text
    row longer than `max_length` becomes several rows, its pieces in order (`piece` 0, 1, ...; 0 for every other
    row). Batched over the fast tokenizer, in `num_proc` processes; `datasets` caches the result when the dataset is
    backed by files or a `cache_file_name` is given. A `TemplateError` carries the dataset index of the row it is
    about (`index`).
    """
    return dataset.map(
        _tokenize_columns,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc,
        with_indices=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "train_on": train_on},
        cache_file_name=cache_file_name,
        desc="Tokenizing",
    )


def _tokenize_columns(
    batch: dict[str, list[Any]],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    train_on: TrainOn,
) -> dict[str, list[Any]]:
    import json

    size = len(indices)
    texts = batch.get("text") or [None] * size
    chat = [i for i in range(size) if texts[i] is None]
    plain = [i for i in range(size) if texts[i] is not None]
    tools = batch.get("tools") or [None] * size
    conversations = [_loaded(batch["messages"][i]) for i in chat]
    try:
        chat_examples = tokenize_batch(
            conversations,
            tokenizer,
            max_length,
            train_on=train_on,
            tools=[json.loads(tools[i]) if isinstance(tools[i], str) else tools[i] for i in chat],
        )
    except TemplateError as e:
        if e.index is not None or len(chat) == 1:
            e.index = indices[chat[e.index or 0]]
        raise
    pieces: list[list[TokenizedExample]] = [[] for _ in range(size)]
    for i, example in zip(chat, chat_examples, strict=True):
        pieces[i] = [example]
    for i, cut in zip(plain, tokenize_texts([texts[i] for i in plain], tokenizer, max_length), strict=True):
        pieces[i] = cut
    rows = [(number, example) for cut in pieces for number, example in enumerate(cut)]  # input order kept
    return {
        "input_ids": [e.input_ids for _, e in rows],
        "labels": [e.labels for _, e in rows],
        "truncated": [e.truncated for _, e in rows],
        "num_trained": [e.num_trained for _, e in rows],
        "piece": [number for number, _ in rows],
    }


def _loaded(messages: Any) -> Any:
    import json

    return json.loads(messages) if isinstance(messages, str) else messages


def _example(
    ids: list[int],
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[Span],
    max_length: int | None,
    train_on: TrainOn,
) -> TokenizedExample:
    trained = [True] * len(ids) if train_on == "all" else _overlaps(offsets, spans)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, trained = ids[:max_length], trained[:max_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained, strict=True)]
    return TokenizedExample(input_ids=ids, labels=labels, truncated=truncated)


def _render_marked(
    conversations: Sequence[Sequence[Message]], tokenizer: PreTrainedTokenizerBase, tools: Sequence[Tools]
) -> list[tuple[str, list[Span]]] | None:
    """Fast path: one rendering per conversation, assistant spans from the template's `{% generation %}` blocks.

    Used only when the template has generation markers and, on the batch's first and last conversations (and the
    first with tools), they give exactly the spans prefix rendering gives (a template may leave the end-of-turn
    token outside its markers); else None, and the caller renders prefixes.
    """
    import re

    from jinja2 import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        return None
    rendered: list[tuple[str, list[Span]]] = []
    for messages, tool_list in zip(conversations, tools, strict=True):
        try:
            texts, indices = render_jinja_template(
                conversations=[[_plain(m) for m in messages]],
                tools=[dict(t) for t in tool_list] if tool_list else None,
                chat_template=template,
                return_assistant_tokens_mask=True,
                **tokenizer.special_tokens_map,
            )
        except JinjaError:
            return None  # let the prefix path raise its clearer error
        text = texts[0]
        spans = [(start, max(start, len(text[:end].rstrip()))) for start, end in indices[0]]
        rendered.append((text, spans))
    with_tools = next((i for i, t in enumerate(tools) if t), 0)
    for i in {0, len(rendered) - 1, with_tools}:
        if rendered[i] != render_with_spans(conversations[i], tokenizer, tools[i]):
            return None
    return rendered


def _plain(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as a dict without null fields: Arrow gives every turn every key of any turn (tool_calls: None)."""
    return {k: v for k, v in message.items() if v is not None}


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Tools = None,
) -> str:
    from jinja2 import TemplateError as JinjaError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; set model.chat_template in the recipe")
    try:
        rendered = tokenizer.apply_chat_template(
            list(messages),
            tools=[dict(t) for t in tools] if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except JinjaError as e:  # templates raise on shapes they refuse, e.g. roles that do not alternate
        hint = _builtin_hint(tokenizer, messages, tools)
        raise TemplateError(f"the chat template refused the conversation: {e}{hint}") from e
    if not isinstance(rendered, str):
        raise TemplateError(f"the chat template rendered {type(rendered).__name__}, expected text")
    return rendered


def _not_a_prefix(count: int, how: str, hint: str) -> TemplateError:
    return TemplateError(
        f"the chat template is not prefix-consistent: the first {count} messages rendered{how} are not a prefix of "
        "the whole conversation, so assistant turns cannot be located; use a template that renders earlier turns "
        f"the same whatever follows (model.chat_template){hint}"
    )


def _builtin_hint(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], tools: Tools) -> str:
    """Names the built-in that writes the refused template's turn format, when it renders this conversation (the
    built-ins are prefix-consistent, so it then masks it too)."""
    from jinja2 import TemplateError as JinjaError

    builtin = builtin_for(getattr(tokenizer, "chat_template", None))
    if builtin is None:
        return ""
    try:
        tokenizer.apply_chat_template(
            list(messages),
            tools=[dict(t) for t in tools] if tools else None,
            chat_template=builtin.source,
            tokenize=False,
        )
    except JinjaError:
        return ""  # e.g. a tool call, which the [INST] built-ins have no place for
    return f"; the built-in '{builtin.name}' writes these turns maskably (model.chat_template: {builtin.name})"


# (template, eos_token) -> what the template writes after the last message only ("" for most templates).
_CLOSING: dict[tuple[str, str | None], str] = {}
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]


def closing_suffix(tokenizer: PreTrainedTokenizerBase) -> str:
    """The EOS a template writes after the last message of a conversation and nowhere else, else "".

    Phi-3.5's template ends every rendering without the generation prompt with `eos_token`, so a conversation's
    first turns do not render as a prefix of it. That EOS closes the conversation, not a turn: it is left untrained
    (each reply is trained through its own end-of-turn marker, which is what generation stops on) and is ignored
    when a prefix is compared with the whole. Found once per template by rendering a two- and a three-turn probe.
    """
    template, eos = getattr(tokenizer, "chat_template", None), tokenizer.eos_token
    if not isinstance(template, str) or not eos:
        return ""
    key = (template, eos)
    if key not in _CLOSING:
        _CLOSING[key] = _probe_closing(tokenizer, eos)
    return _CLOSING[key]


def _probe_closing(tokenizer: PreTrainedTokenizerBase, eos: str) -> str:
    try:
        short = _render(tokenizer, _PROBE[:2], add_generation_prompt=False)
        longer = _render(tokenizer, _PROBE, add_generation_prompt=False)
    except TemplateError:
        return ""
    if longer.startswith(short) or not short.endswith(eos) or not longer.endswith(eos):
        return ""
    return eos if longer.startswith(short[: -len(eos)]) else ""


def _overlaps(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """For each token's [start, end) characters, whether it overlaps one of the sorted, disjoint spans."""
    starts = [start for start, _ in offsets]
    ends = [end for _, end in offsets]
    if starts == sorted(starts) and ends == sorted(ends):  # the usual case: find each span's tokens by bisection
        flags = [False] * len(offsets)
        for low, high in spans:
            for k in range(bisect.bisect_right(ends, low), bisect.bisect_left(starts, high)):
                flags[k] = ends[k] > starts[k]
        return flags
    flags = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        flags.append(end > start and k < len(spans) and start < spans[k][1] and end > spans[k][0])
    return flags


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def wrap_trained_runs(
    ids: Sequence[int], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase, start: str, end: str
) -> str:
    """The token ids decoded, each run of trained tokens (label != IGNORE_INDEX) wrapped in `start` ... `end`."""
    pieces: list[str] = []
    run: list[int] = []
    run_trained = False
    for token, label in [*zip(ids, labels, strict=True), (None, None)]:
        trained = label is not None and label != IGNORE_INDEX
        if token is None or (run and trained != run_trained):
            text = tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(f"{start}{text}{end}" if run_trained else text)
            run = []
        if token is not None:
            run.append(token)
            run_trained = trained
    return "".join(pieces)
