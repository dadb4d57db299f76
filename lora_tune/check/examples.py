"""The rows the pre-flight check looks at, and the facts about each one that the checks judge.

Rows are read and converted exactly as the data pipeline does (`load_source`: column mapping, format, bad rows),
and tokenized with the pipeline's own `tokenize_rows` (with the recipe's data.thinking), so the check sees the
examples training will see: one per row, or one per assistant turn where a thinking template trains turn by turn.
Plain-text examples (the text format) use no chat template and are not sampled.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_tune.data.formats import Conversation
from lora_tune.data.masking import (
    IGNORE_INDEX,
    Rendering,
    Span,
    Thinking,
    TokenizedExample,
    conversation_rows,
    tokenize_rows,
    wrap_trained_runs,
)
from lora_tune.data.pipeline import load_source
from lora_tune.recipe.schema import DatasetConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SampledRow:
    file: str
    row: int  # 1-based, as in the pipeline's data errors
    messages: Conversation
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class ExampleFacts:
    """One row, tokenized whole (`full`) and as training keeps it (`example`, cut to max_length)."""

    source: SampledRow
    full: TokenizedExample
    example: TokenizedExample
    turns: list[Span]  # [start, end) token ranges of the runs of trained tokens in `full`: one per assistant turn
    prompt_text_trained: str | None  # system or user text that falls inside a trained span, if any

    @property
    def trained_flags(self) -> list[bool]:
        return [label != IGNORE_INDEX for label in self.full.labels]


def sample_rows(
    configs: Sequence[DatasetConfig],
    limit: int | None,
    seed: int,
    *,
    skip_bad: bool = False,
) -> tuple[list[SampledRow], dict[str, dict[str, int]]]:
    """Up to `limit` rows of each dataset (a seeded sample, in file order, when it has more), as conversations; a
    row over the memory bound (`sources.RowLimit`) is a bad row here too, refused before it is tokenized."""
    rows: list[SampledRow] = []
    sources: dict[str, dict[str, int]] = {}
    for index, cfg in enumerate(configs):
        examples, _ = load_source(cfg, skip_bad=skip_bad)
        conversational = [(origin, e) for origin, e in examples if e.text is None]
        picked: Sequence[int] = range(len(conversational))
        if limit is not None and len(conversational) > limit:
            picked = sorted(random.Random(seed + index).sample(range(len(conversational)), limit))
        for i in picked:
            origin, example = conversational[i]
            rows.append(SampledRow(cfg.path, origin.number, example.messages, example.tools))
        counts = sources.setdefault(cfg.path, {"rows": 0, "checked": 0})
        counts["rows"] += len(examples)
        counts["checked"] += len(picked)
    return rows, sources


def inspect_row(
    row: SampledRow, tokenizer: PreTrainedTokenizerBase, max_length: int | None, thinking: Thinking = "auto"
) -> list[ExampleFacts]:
    """Tokenize one row as the pipeline does: the facts of each training row it becomes (one, or one per assistant
    turn); raises the pipeline's `TemplateError` when the template refuses it."""
    rows = tokenize_rows(row.messages, tokenizer, tools=row.tools, thinking=thinking)
    cut = rows
    if max_length is not None and any(len(r.input_ids) > max_length for r in rows):
        cut = tokenize_rows(row.messages, tokenizer, max_length, tools=row.tools, thinking=thinking)
    renderings = conversation_rows(row.messages, tokenizer, row.tools, thinking=thinking)
    facts = []
    for full, example, rendering in zip(rows, cut, renderings, strict=True):
        trained = [label != IGNORE_INDEX for label in full.labels]
        facts.append(ExampleFacts(row, full, example, _runs(trained), _prompt_text_trained(rendering)))
    return facts


def _runs(flags: Sequence[bool]) -> list[Span]:
    runs: list[Span] = []
    start: int | None = None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _prompt_text_trained(rendering: Rendering) -> str | None:
    """The first system or user text found inside a trained span of the rendering (the spans masking trains).

    Each system or user message's content is looked up in the rendered text in conversation order, after the
    previous trained reply's span (stripped, when the template trims it); a content the template rewrote is not
    judged. Replies that are context in this row (earlier turns of a turn-by-turn row) are skipped.
    """
    text, spans = rendering.text, rendering.spans
    span_of = dict(zip(rendering.trained, spans, strict=True))
    cursor = 0
    for index, message in enumerate(rendering.messages):
        if message["role"] == "assistant":
            if index in span_of:
                cursor = max(cursor, span_of[index][1])  # what follows starts after the reply and its end marker
            continue
        content = message.get("content") or ""
        needle = content if content and content in text[cursor:] else content.strip()
        position = text.find(needle, cursor) if needle else -1
        if position < 0:
            continue
        cursor = position + len(needle)
        if any(start < cursor and position < stop for start, stop in spans):
            return needle
    return None


def mark_trained(example: TokenizedExample, tokenizer: PreTrainedTokenizerBase) -> str:
    """The example decoded, with each run of trained tokens wrapped in [[...]]."""
    return wrap_trained_runs(example.input_ids, example.labels, tokenizer, "[[", "]]")
