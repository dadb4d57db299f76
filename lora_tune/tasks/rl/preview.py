"""`lora-tune data` for an online RL recipe (training.objective: grpo, rloo)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from lora_tune.data.preview import LengthStats
from lora_tune.recipe.schema import Recipe
from lora_tune.tasks.rl.checks import prompt_ids
from lora_tune.tasks.rl.data import load_prompt_splits

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def format_rl_preview(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, *, n: int, color: bool) -> str:
    """`lora-tune data` for an RL recipe: prompts per split, their token lengths with the generation prompt, how many
    leave no room for the completion, and the first prompts as the policy sees them, with the columns the rewards
    read."""
    splits = load_prompt_splits(recipe)
    lengths = [len(prompt_ids(tokenizer, row["prompt"])) for row in splits.train]
    room, limit = recipe.rl.max_completion_length, recipe.training.max_length
    tight = sum(1 for length in lengths if limit and length + room > limit)
    lines = [
        f"{recipe.training.objective}: {len(splits.train)} training prompts, {len(splits.validation)} validation, "
        f"{len(splits.test)} test; {recipe.rl.num_generations} completions sampled per prompt",
        f"  prompt tokens: {LengthStats.of(lengths).describe()}",
        f"  no room for max_completion_length {room} within max_length {limit}: {tight} of {len(lengths)} prompts",
    ]
    for row in splits.train[:n]:
        ids = prompt_ids(tokenizer, row["prompt"])
        columns = {k: v for k, v in row.items() if k != "prompt"}
        lines += ["", tokenizer.decode(ids), f"  columns for the rewards: {json.dumps(columns, ensure_ascii=False)}"]
    return "\n".join(lines)
