"""Tokenize a conversation with the tokenizer's chat template and train only on what the assistant says.

Works with any prefix-consistent chat template, with or without `{% generation %}` markers: the conversation is
rendered once, and each assistant turn is located as a character span by rendering prefixes of it. Assistant turn
`i` starts where `messages[:i]` rendered with the generation prompt ends, and ends where `messages[:i + 1]` ends
(so the end-of-turn marker is trained, and the model learns to stop), less trailing whitespace. The full text is
tokenized once with offsets, and a token is trained when its characters overlap an assistant span.

`train_on="all"` trains every token instead (full-sequence loss). `tokenize_batch` renders many conversations and
tokenizes them in one call of the fast (Rust) tokenizer; `tokenize_dataset` runs it through `datasets.map`
(batched, `num_proc` workers, cached by `datasets` when the dataset is backed by files).

Thinking templates (their source mentions `<think>`, `enable_thinking` or `reasoning_content`: Qwen3, Qwen3.5, QwQ,
the DeepSeek-R1 distills, SmolLM3) render with `enable_thinking` as `data.thinking` says (`resolve_thinking`: auto is
on for a conversation with reasoning, off without). Turn `i`'s prompt is what inference renders,
`messages[:i]` with the generation prompt (`apply_template`, which `model.chat_template.generation_prompt` calls
too), so what the template forces there (an opened `<think>\n`, a closed empty block) is context, and the reply
that follows it is trained: its reasoning, answer and end-of-turn marker. Where the template drops the reasoning of
the turn it renders last (the R1 distills), the reply is the template's turn with the reasoning written back as
`<think>\n{reasoning}\n</think>\n\n` before the answer. When every turn's prompt and reply are a prefix of the
whole rendering, the conversation is one row; when they are not (the template drops earlier turns' reasoning, or
writes the last turn unlike earlier ones), it becomes one row per assistant turn, each its prompt (earlier turns as
the template renders them at inference) and its trained reply. A template that does not read `reasoning_content`
gets the reasoning inline, as that block opening the content (`template_messages`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from lora_tune.data.formats import THINK_CLOSE, THINK_OPEN, Message, has_reasoning
from lora_tune.recipe.templates import builtin_for

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that do not contribute to the loss (what transformers' loss ignores)

Span = tuple[int, int]
TrainOn = Literal["assistant", "all"]
Thinking = Literal["auto", "on", "off"]  # the recipe's data.thinking
Tools = Sequence[Mapping[str, Any]] | None
# The tokenizer_config.json key recording the enable_thinking a run trained with (`record_thinking`).
THINKING_RECORD = "lora_tune_enable_thinking"
_THINKING_MARKS = (THINK_OPEN, "enable_thinking", "reasoning_content")


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


@dataclass(frozen=True)
class Rendering:
    """One training row of a conversation: its text, the [start, end) character span of each trained reply, and the
    messages it renders (all of them, or, for one turn's row, those up to that turn)."""

    text: str
    spans: list[Span]
    messages: list[dict[str, Any]]
    trained: list[int]  # the index in `messages` of the assistant turn each span trains


def is_thinking_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template has a thinking mode or writes reasoning (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and any(mark in template for mark in _THINKING_MARKS)


def resolve_thinking(messages: Sequence[Mapping[str, Any]], thinking: Thinking) -> bool:
    """The enable_thinking a conversation renders with: on, off, or (auto) whether a reply of it has reasoning."""
    return has_reasoning(messages) if thinking == "auto" else thinking == "on"


def think_block(reasoning: str) -> str:
    """The reasoning as the Qwen3 and DeepSeek-R1 templates write it before the answer."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"


def template_messages(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The messages as the chat template gets them: without null fields and, for a template that does not read
    `reasoning_content`, each reply's reasoning written inline as a think block opening its content."""
    template = getattr(tokenizer, "chat_template", None)
    reads = isinstance(template, str) and "reasoning_content" in template
    out = []
    for message in messages:
        plain = _plain(message)
        reasoning = plain.get("reasoning_content")
        if reasoning and not reads:
            plain.pop("reasoning_content")
            plain["content"] = think_block(reasoning) + (plain.get("content") or "")
        out.append(plain)
    return out


def apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: Tools = None,
    thinking: bool | None = None,
) -> str:
    """The chat template's text of `messages` (`template_messages`), with `enable_thinking=thinking` unless None: the
    one call training and inference (`model.chat_template.generation_prompt`) render a conversation with."""
    extra = {} if thinking is None else {"enable_thinking": thinking}
    return tokenizer.apply_chat_template(
        template_messages(tokenizer, messages),
        tools=[dict(t) for t in tools] if tools else None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **extra,
    )


def record_thinking(tokenizer: PreTrainedTokenizerBase, enable: bool) -> None:
    """Record on the tokenizer (saved with the run's adapter, in tokenizer_config.json) the enable_thinking its run
    trained with, which `model.chat_template.generation_prompt` then uses; only for templates with the switch."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and "enable_thinking" in template:
        tokenizer.init_kwargs[THINKING_RECORD] = enable


def recorded_thinking(tokenizer: PreTrainedTokenizerBase) -> bool | None:
    """The enable_thinking recorded by `record_thinking` on this tokenizer (or the one saved with a run), else None."""
    value = (getattr(tokenizer, "init_kwargs", None) or {}).get(THINKING_RECORD)
    return value if isinstance(value, bool) else None


def conversation_rows(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    tools: Tools = None,
    *,
    thinking: Thinking = "auto",
) -> list[Rendering]:
    """The training rows of a conversation: one (the rendering, each reply's span), or, for a thinking template that
    renders a turn differently once others follow, one per assistant turn (see the module docstring)."""
    if not is_thinking_template(tokenizer):
        text, spans = render_with_spans(messages, tokenizer, tools)
        plain = [_plain(m) for m in messages]
        return [Rendering(text, spans, plain, [i for i, m in enumerate(plain) if m["role"] == "assistant"])]
    plain = [_plain(m) for m in messages]
    enable = resolve_thinking(plain, thinking)
    if not enable and has_reasoning(plain):
        raise TemplateError(
            "a reply has reasoning (reasoning_content or a <think> block) but data.thinking is off, which closes the "
            "think block in the prompt before the answer; set data.thinking: auto (or on), or remove the reasoning"
        )
    text = _render(tokenizer, plain, add_generation_prompt=False, tools=tools, thinking=enable)
    closing = closing_suffix(tokenizer)
    turns: list[tuple[int, str, str]] = []  # (message index, prompt, trained reply)
    for i, message in enumerate(plain):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError("the conversation starts with an assistant turn; a user turn must come first")
        before = _render(tokenizer, plain[:i], add_generation_prompt=True, tools=tools, thinking=enable)
        through = _render(tokenizer, plain[: i + 1], add_generation_prompt=False, tools=tools, thinking=enable)
        if closing and through.endswith(closing):
            through = through[: -len(closing)]
        reply = _reply(before, through, message)
        if reply is None:
            raise _unfollowable(i, before, enable)
        turns.append((i, before, reply))
    if all(text.startswith(before + reply.rstrip()) for _, before, reply in turns):
        spans = [(len(before), len(before) + len(reply.rstrip())) for _, before, reply in turns]
        return [Rendering(text, spans, plain, [i for i, _, _ in turns])]
    return [
        Rendering(before + reply, [(len(before), len(before) + len(reply.rstrip()))], plain[: i + 1], [i])
        for i, before, reply in turns
    ]


def _reply(before: str, through: str, message: Mapping[str, Any]) -> str | None:
    """What follows the generation prompt `before` in the turn `through` ends with: the template's own turn when it
    continues the prompt and keeps the reasoning, else the turn with the reasoning written back before its answer
    (or, after a closed think block the prompt forces, the answer); None when neither continues the prompt."""
    reasoning = message.get("reasoning_content") or ""
    if through.startswith(before) and reasoning in through[len(before) :]:
        return through[len(before) :]
    answer = (message.get("content") or "").strip()
    position = through.rfind(answer) if answer else -1
    if position < 0:
        return None
    head, tail = through[:position], through[position:]
    if not before.startswith(head):  # e.g. the "\n\n" left of an inline block whose reasoning the template cut
        head = head.rstrip()
    if not before.startswith(head):
        return None
    forced = before[len(head) :]
    candidates = [head + think_block(reasoning) + tail]
    if not reasoning and THINK_CLOSE in forced:  # thinking off: the prompt closed the block; the answer follows it
        candidates.append(before + ("" if forced.endswith("\n") else "\n\n") + tail)
    return next((c[len(before) :] for c in candidates if c.startswith(before)), None)


def _unfollowable(index: int, before: str, enable: bool) -> TemplateError:
    ending = before[-24:]
    return TemplateError(
        f"the reply at messages[{index}] cannot follow its generation prompt (ending {ending!r}, enable_thinking="
        f"{str(enable).lower()}): the template writes that turn neither after the prompt nor with its answer where "
        "reasoning can be put back; set data.thinking to match the rows, or model.chat_template to a template whose "
        "generation prompt the reply continues"
    )


def render_with_spans(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, tools: Tools = None
) -> tuple[str, list[Span]]:
    """The conversation rendered by the chat template, and the [start, end) character span of each assistant turn
    (the prefix-consistent case; `conversation_rows` handles thinking templates)."""
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
    thinking: Thinking = "auto",
) -> TokenizedExample:
    """Token ids and labels of a canonical conversation that is one training row; ids are cut to the first
    `max_length` when longer. A conversation a thinking template makes several rows raises `TemplateError` here:
    `tokenize_rows` gives them.

    Check `num_trained` on the result: truncation may leave no assistant token, and such an example teaches nothing.
    """
    rows = tokenize_rows(messages, tokenizer, max_length, train_on=train_on, tools=tools, thinking=thinking)
    if len(rows) != 1:
        raise TemplateError(
            f"the conversation is {len(rows)} training rows (one per assistant turn); see tokenize_rows"
        )
    return rows[0]


def tokenize_rows(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    train_on: TrainOn = "assistant",
    tools: Tools = None,
    thinking: Thinking = "auto",
) -> list[TokenizedExample]:
    """The training rows of one conversation (`conversation_rows`), tokenized and labelled."""
    return tokenize_conversations(
        [messages], tokenizer, max_length, train_on=train_on, tools=[tools], thinking=thinking
    )[0]


def tokenize_batch(
    conversations: Sequence[Sequence[Message]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    train_on: TrainOn = "assistant",
    tools: Sequence[Tools] | None = None,
    thinking: Thinking = "auto",
) -> list[TokenizedExample]:
    """The training rows of many conversations, in order (one per conversation, or one per assistant turn where a
    thinking template needs it), with one batched call of the fast tokenizer."""
    rows = tokenize_conversations(
        conversations, tokenizer, max_length, train_on=train_on, tools=tools, thinking=thinking
    )
    return [row for conversation in rows for row in conversation]


def tokenize_conversations(
    conversations: Sequence[Sequence[Message]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None = None,
    *,
    train_on: TrainOn = "assistant",
    tools: Sequence[Tools] | None = None,
    thinking: Thinking = "auto",
) -> list[list[TokenizedExample]]:
    """Each conversation's training rows, with one batched call of the fast tokenizer.

    `tools[i]` (optional) is the tool list of conversation i, passed to the chat template as `tools=`. Raises
    `TemplateError` for the first conversation the template cannot render or mask.
    """
    if not conversations:
        return []
    tool_lists = list(tools) if tools is not None else [None] * len(conversations)
    # One rendering per conversation pays off once the few cross-checks of `_render_marked` are amortised.
    marked = _render_marked(conversations, tokenizer, tool_lists) if len(conversations) >= 8 else None
    rendered: list[list[tuple[str, list[Span]]]] = [[row] for row in marked] if marked is not None else []
    if marked is None:
        for i, (messages, tool_list) in enumerate(zip(conversations, tool_lists, strict=True)):
            try:
                rows = conversation_rows(messages, tokenizer, tool_list, thinking=thinking)
            except TemplateError as e:
                e.index = i if len(conversations) > 1 else None  # lets the caller name the row
                raise
            rendered.append([(row.text, row.spans) for row in rows])
    flat = [row for rows in rendered for row in rows]
    if marked is None and is_thinking_template(tokenizer):
        examples = iter(_segmented(flat, tokenizer, max_length, train_on))
        return [[next(examples) for _ in rows] for rows in rendered]
    try:
        encoding = tokenizer([text for text, _ in flat], add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
        raise TemplateError("assistant-only masking needs a fast tokenizer (one with offset mappings)") from e
    # No BOS beyond what the template writes: inference renders the prompt with the same template and tokenizes it
    # without special tokens (as apply_chat_template(tokenize=True) does), so a BOS added here would be seen in
    # training only (Phi-3.5's template writes none while its tokenizer adds one by default).
    examples = iter(
        _example(list(ids), _overlaps(offsets, spans) if train_on == "assistant" else None, max_length)
        for ids, offsets, (_, spans) in zip(encoding["input_ids"], encoding["offset_mapping"], flat, strict=True)
    )
    return [[next(examples) for _ in rows] for rows in rendered]


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
    thinking: Thinking = "auto",
) -> Dataset:
    """Map a dataset with a `messages` column (a list of turns or its JSON text; optionally `tools`, a list or its
    JSON text, and `text`: rows whose text is not null are plain text) to tokenized columns.

    Adds `input_ids`, `labels`, `truncated`, `num_trained` and `piece` and removes the other columns. A plain-text
    row longer than `max_length` becomes several rows, its pieces in order (`piece` 0, 1, ...; 0 for every other
    row), and so does a conversation a thinking template trains one assistant turn at a time (its turns' rows;
    `piece` is negative for those after the first: -1, -2, ...). Batched over the fast tokenizer, in `num_proc`
    processes; `datasets` caches the result when the dataset is
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
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "train_on": train_on, "thinking": thinking},
        cache_file_name=cache_file_name,
        desc="Tokenizing",
    )


def _tokenize_columns(
    batch: dict[str, list[Any]],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    train_on: TrainOn,
    thinking: Thinking = "auto",
) -> dict[str, list[Any]]:
    import json

    size = len(indices)
    texts = batch.get("text") or [None] * size
    chat = [i for i in range(size) if texts[i] is None]
    plain = [i for i in range(size) if texts[i] is not None]
    tools = batch.get("tools") or [None] * size
    conversations = [_loaded(batch["messages"][i]) for i in chat]
    try:
        chat_rows = tokenize_conversations(
            conversations,
            tokenizer,
            max_length,
            train_on=train_on,
            tools=[json.loads(tools[i]) if isinstance(tools[i], str) else tools[i] for i in chat],
            thinking=thinking,
        )
    except TemplateError as e:
        if e.index is not None or len(chat) == 1:
            e.index = indices[chat[e.index or 0]]
        raise
    pieces: list[list[tuple[int, TokenizedExample]]] = [[] for _ in range(size)]
    for i, turn_rows in zip(chat, chat_rows, strict=True):
        pieces[i] = [(-number, example) for number, example in enumerate(turn_rows)]
    for i, cut in zip(plain, tokenize_texts([texts[i] for i in plain], tokenizer, max_length), strict=True):
        pieces[i] = list(enumerate(cut))
    rows = [pair for cut in pieces for pair in cut]  # input order kept
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


def _example(ids: list[int], trained: list[bool] | None, max_length: int | None) -> TokenizedExample:
    """The example of `ids` with `trained` flags (None: every token, train_on all), cut to `max_length`."""
    trained = [True] * len(ids) if trained is None else trained
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, trained = ids[:max_length], trained[:max_length]
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, trained, strict=True)]
    return TokenizedExample(input_ids=ids, labels=labels, truncated=truncated)


def _segmented(
    rows: Sequence[tuple[str, list[Span]]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    train_on: TrainOn,
) -> list[TokenizedExample]:
    """Rows of a thinking template, each tokenized as its pieces (prompt, reply, what lies between): a prompt is then
    the very tokens inference gets from the same text, even where the template forces characters that would merge
    with the reply's into one token (Llama 3's "\n\n" after a forced "<think>\n")."""
    pieces: list[str] = []
    owners: list[tuple[int, bool]] = []  # (row, whether the piece is a trained reply)
    for number, (text, spans) in enumerate(rows):
        cuts = sorted({0, len(text), *(edge for span in spans for edge in span)})
        for start, end in zip(cuts, cuts[1:], strict=False):
            pieces.append(text[start:end])
            owners.append((number, (start, end) in spans))
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
    ids: list[list[int]] = [[] for _ in rows]
    flags: list[list[bool]] = [[] for _ in rows]
    for (number, reply), piece in zip(owners, encoded, strict=True):
        ids[number] += piece
        flags[number] += [reply] * len(piece)
    return [
        _example(row_ids, row_flags if train_on == "assistant" else None, max_length)
        for row_ids, row_flags in zip(ids, flags, strict=True)
    ]


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
    if is_thinking_template(tokenizer):  # rendered with enable_thinking, turn by turn: `conversation_rows`
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
    thinking: bool | None = None,
) -> str:
    from jinja2 import TemplateError as JinjaError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; set model.chat_template in the recipe")
    try:
        rendered = apply_template(
            tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools, thinking=thinking
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


@dataclass(frozen=True)
class ImageExample(TokenizedExample):
    """A conversation with images as the model takes it: the processor's ids (each image expanded into its image
    tokens), the labels of the assistant turns, and how many ids are image tokens (never trained)."""

    image_tokens: int = 0


def render_image_conversation(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[int], list[bool]]:
    """A conversation with image parts rendered by the chat template (one placeholder per image), its token ids
    before the processor expands the images, and which of them are trained (the assistant turns, as text rows)."""
    text, spans = render_with_spans(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, list(encoded["input_ids"]), _overlaps(encoded["offset_mapping"], spans)


def label_image_tokens(
    plain: Sequence[int],
    trained: Sequence[bool],
    expanded: Sequence[int],
    max_length: int | None,
    placeholders: frozenset[int] = frozenset(),
) -> ImageExample:
    """The labels of `expanded`, the processor's ids of the rendered text, from the flags of `plain`, its ids before
    each image placeholder became the image's tokens: the ids the two share keep their flag, the ids the processor
    inserted (the image tokens and their markers) and the `placeholders` (the image token) are never trained. An
    image that `max_length` would cut, leaving
    the model fewer image tokens than image features, raises TemplateError; text after the last image is cut."""
    from difflib import SequenceMatcher

    flags = [False] * len(expanded)
    inserted = [False] * len(expanded)
    matcher = SequenceMatcher(None, list(plain), list(expanded), autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            flags[b0:b1] = trained[a0:a1]
        elif op in ("insert", "replace"):
            if any(trained[a0:a1]):
                raise TemplateError("the processor changed trained text while expanding the images")
            inserted[b0:b1] = [True] * (b1 - b0)
        elif any(trained[a0:a1]):  # delete: the processor dropped trained tokens
            raise TemplateError("the processor dropped trained text while expanding the images")
    ids = list(expanded)
    image_ids = {token for token, hit in zip(ids, inserted, strict=True) if hit} | placeholders
    inserted = [hit or token in image_ids for token, hit in zip(ids, inserted, strict=True)]
    last_image = max((k for k, hit in enumerate(inserted) if hit), default=-1)
    if max_length is not None and last_image >= max_length:
        raise TemplateError(
            f"an image is cut by max_length {max_length}: its tokens end at {last_image + 1} of {len(ids)}; raise "
            "training.max_length, or use fewer or smaller images"
        )
    example = _example(ids, [f and not i for f, i in zip(flags, inserted, strict=True)], max_length)
    return ImageExample(example.input_ids, example.labels, example.truncated, sum(inserted))
