"""`lora-tune data RECIPE`: what the model will be trained on, before any GPU time is spent.

Runs the real data pipeline with the recipe's tokenizer (never model weights) and reports counts per source and
split, token length statistics, what was dropped and why, the padding fraction packed and padded, and the first
examples rendered with the chat template, trained tokens highlighted (colour on a terminal, ⟦markers⟧ otherwise).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_tune.data.masking import IGNORE_INDEX, wrap_trained_runs
from lora_tune.data.packing import describe_batching
from lora_tune.data.pipeline import build_datasets
from lora_tune.data.sources import load_rows
from lora_tune.recipe.schema import Recipe
from lora_tune.recipe.templates import builtin_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lora_tune.data.pipeline import PreparedData

OPEN, CLOSE = "⟦", "⟧"  # trained tokens when the output is not a terminal
ANSI_TRAINED, ANSI_RESET = "\x1b[1;32m", "\x1b[0m"  # bold green


@dataclass(frozen=True)
class LengthStats:
    count: int
    min: int
    median: float
    p95: int
    max: int

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        ordered = sorted(lengths)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
        return cls(len(ordered), ordered[0], statistics.median(ordered), p95, ordered[-1])

    def describe(self) -> str:
        return f"min {self.min}  median {self.median:g}  p95 {self.p95}  max {self.max}"


@dataclass
class Preview:
    recipe: Recipe
    sources: list[tuple[str, str, int]]  # (role: train/eval, path, rows read)
    summary: str  # the pipeline's per-split stats: rows, tokens, trained share, truncated/dropped and why
    lengths: dict[str, LengthStats]
    batching: str
    template: str
    examples: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (input_ids, labels)
    train_rows: int = 0


def build_preview(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, n: int = 3) -> Preview:
    """Prepare the recipe's data exactly as `train` does, and gather what the preview shows."""
    prepared = build_datasets(recipe, tokenizer)
    splits = prepared.datasets
    lengths = {name: [len(ids) for ids in splits[name]["input_ids"]] for name in splits}
    train = splits["train"]
    return Preview(
        recipe=recipe,
        sources=_source_counts(recipe, prepared),
        summary=prepared.stats.summary(),
        lengths={name: LengthStats.of(values) for name, values in lengths.items() if values},
        batching=describe_batching(recipe, lengths["train"]),
        template=_template_name(recipe),
        examples=[(train[i]["input_ids"], train[i]["labels"]) for i in range(min(n, len(train)))],
        train_rows=len(train),
    )


def format_preview(preview: Preview, tokenizer: PreTrainedTokenizerBase, *, color: bool) -> str:
    t = preview.recipe.training
    lines = ["sources:"]
    width = max(len(path) for _, path, _ in preview.sources)
    lines += [f"  {path:<{width}}  {rows:>8,} rows  ({role})" for role, path, rows in preview.sources]
    lines += ["splits:", *(f"  {line}" for line in preview.summary.splitlines())]
    lines.append("token lengths:")
    lines += [f"  {name:<10} {stats.describe()}" for name, stats in preview.lengths.items()]
    lines.append(f"batching (batch_size {t.batch_size}, max_length {t.max_length}): {preview.batching}")
    lines.append(f"loss on: {t.train_on} tokens;  chat template: {preview.template}")
    legend = "trained tokens in bold green" if color else f"trained tokens in {OPEN}…{CLOSE}"
    for i, (ids, labels) in enumerate(preview.examples, start=1):
        trained = sum(label != IGNORE_INDEX for label in labels)
        lines.append("")
        lines.append(f"--- example {i} of {preview.train_rows:,} ({len(ids)} tokens, {trained} trained; {legend})")
        lines.append(highlight(ids, labels, tokenizer, color=color))
    return "\n".join(lines)


def highlight(ids: Sequence[int], labels: Sequence[int], tokenizer: PreTrainedTokenizerBase, *, color: bool) -> str:
    """The token ids decoded, each run of trained tokens wrapped in colour or markers."""
    start, end = (ANSI_TRAINED, ANSI_RESET) if color else (OPEN, CLOSE)
    return wrap_trained_runs(ids, labels, tokenizer, start, end)


def _source_counts(recipe: Recipe, prepared: PreparedData) -> list[tuple[str, str, int]]:
    """Rows read per source: from the pipeline's stats when it records them, else by reading each source."""
    recorded = getattr(prepared.stats, "sources", None)
    if recorded:
        return [
            (s.split + (f"; {s.bad_rows:,} bad rows skipped" if s.bad_rows else ""), s.path, s.rows) for s in recorded
        ]

    counts = [("train", cfg.path, len(load_rows(cfg))) for cfg in recipe.datasets]
    return counts + [("validation", cfg.path, len(load_rows(cfg))) for cfg in recipe.eval_datasets]


def _template_name(recipe: Recipe) -> str:
    choice = recipe.model.chat_template
    if choice is None:
        return "the tokenizer's own"
    builtin = builtin_template(choice)
    if builtin is not None:
        return f"{builtin.name} (built-in)"
    return choice if choice.endswith(".jinja") else "inline Jinja from the recipe"
