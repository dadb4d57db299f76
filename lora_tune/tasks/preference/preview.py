"""`lora-tune data` for a preference recipe (training.objective: dpo, orpo, kto, simpo)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_tune.data.preview import ANSI_RESET, ANSI_TRAINED, CLOSE, OPEN, LengthStats
from lora_tune.recipe.rules import OBJECTIVES
from lora_tune.recipe.schema import Recipe
from lora_tune.tasks.preference.data import load_preference_splits, tokenize_pair

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def format_preference_preview(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, *, n: int, color: bool) -> str:
    """`lora-tune data` for a preference recipe: rows per split, token lengths of prompts and answers as the trainer
    tokenizes them, how many rows max_length cuts, and the first pairs rendered (answers, the end-of-turn marker
    included, in the trained-token markers)."""
    splits = load_preference_splits(recipe)
    tokenized = [tokenize_pair(tokenizer, row) for row in splits.train]
    limit = recipe.training.max_length
    cut = sum(1 for prompt, answers in tokenized if limit and any(len(prompt) + len(a) > limit for a in answers))
    start, end = (ANSI_TRAINED, ANSI_RESET) if color else (OPEN, CLOSE)
    lines = [
        f"{recipe.training.objective}: {len(splits.train)} training rows, {len(splits.validation)} validation, "
        f"{len(splits.test)} test",
        f"  prompt tokens:  {LengthStats.of([len(p) for p, _ in tokenized]).describe()}",
    ]
    for i, name in enumerate(a for a in OBJECTIVES[recipe.training.objective].answers if a != "label"):
        lines.append(f"  {name} tokens: {LengthStats.of([len(a[i]) for _, a in tokenized]).describe()}")
    lines.append(f"  cut by max_length {limit}: {cut} of {len(tokenized)} rows")
    for (prompt, answers), row in list(zip(tokenized, splits.train, strict=True))[:n]:
        lines += ["", tokenizer.decode(prompt)]
        for name, answer in zip(("chosen", "rejected", "completion"), answers, strict=False):
            label = name if "label" not in row else f"completion ({'desirable' if row['label'] else 'undesirable'})"
            lines.append(f"  {label}: {start}{tokenizer.decode(answer)}{end}")
    return "\n".join(lines)
