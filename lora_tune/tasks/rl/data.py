"""The prompts of an online RL run (grpo, rloo), with the columns its rewards read.

Accepted rows (after the recipe's `columns:` mapping):
- prompts: `{"prompt": str | [turns], "answer": ..., any other column}`: the prompt the policy answers, and the
  columns the rewards read (the answer reward reads `answer`, or the column its recipe entry names); every other
  column is passed to the reward functions as a keyword argument, as TRL does;
- any chat format SFT reads (messages, alpaca, sharegpt, prompt_completion): the conversation up to its last assistant
  turn is the prompt, and that turn's text is the reference answer. So the data an SFT stage trained on, with its
  answers, is the data the RL stage that follows it checks against.

Every row becomes `{"prompt": [turns], <reference column>: str, ...}` (conversational: TRL renders it with the run's
chat template and its generation prompt). A row without a user turn to answer, or with more text than a row may have,
is refused with its file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_tune.data.cleaning import hold_out
from lora_tune.data.formats import detect_format, map_columns, to_example
from lora_tune.data.sources import Origin, RowLimit, read_source, text_chars
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig, Recipe

ROW_LIMIT = RowLimit(skippable=False)
Turns = list[dict[str, Any]]


@dataclass
class PromptSplits:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)


def reference_column(recipe: Recipe) -> str:
    """Where a chat row's last answer goes: the column the (first) answer reward reads, else `answer`."""
    return next((r.column for r in recipe.rl.rewards if r.name == "answer"), "answer")


def load_prompt_splits(recipe: Recipe) -> PromptSplits:
    """Every source read and checked; validation from eval_datasets or a seeded val_size share."""
    column = reference_column(recipe)
    train = [row for s in recipe.datasets for _, row in prompt_rows_with_origins(s, column)]
    validation = [row for s in recipe.eval_datasets for _, row in prompt_rows_with_origins(s, column)]
    test = [row for s in recipe.test_datasets for _, row in prompt_rows_with_origins(s, column)]
    if recipe.val_size > 0 and not validation:
        validation, train = hold_out(train, recipe.val_size, recipe.training.seed)
    if not train:
        raise DataError("no training prompts left after the validation split", file=recipe.datasets[0].path)
    _same_columns(train + validation, recipe.datasets[0].path)
    return PromptSplits(train, validation, test)


def prompt_rows_with_origins(source: DatasetConfig, column: str = "answer") -> list[tuple[Origin, dict[str, Any]]]:
    """(where the row is, the TRL example) for each row of one source; a bad row raises naming file and line."""
    rows = read_source(source, row_limit=ROW_LIMIT).rows
    if not rows:
        raise DataError("has no rows", file=source.path)
    examples = []
    fmt: str | None = None
    for origin, raw in rows:
        row = map_columns(raw, source.columns, origin)
        if fmt is None:
            fmt = _format(source, row)
        example = _from_prompts(row, origin) if fmt == "prompts" else _from_chat(row, fmt, origin, column)
        if source.system_prompt is not None and example["prompt"][0]["role"] != "system":
            example["prompt"].insert(0, {"role": "system", "content": source.system_prompt})
        size = sum(text_chars(v) for v in example.values())
        if size > ROW_LIMIT.chars:
            raise origin.error(ROW_LIMIT.refusal(f"has {size:,} characters of text"), "prompt")
        examples.append((origin, example))
    return examples


def _format(source: DatasetConfig, row: Mapping[str, Any]) -> str:
    if source.format != "auto":
        return source.format
    if "prompt" in row and "completion" not in row:
        return "prompts"
    return detect_format(row, file=source.path)


def _from_prompts(row: Mapping[str, Any], origin: Origin) -> dict[str, Any]:
    if "prompt" not in row:
        raise origin.error("a prompts row needs a 'prompt' (text or a message list)", "prompt")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise origin.error("prompt is empty", "prompt")
        turns: Turns = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(_is_turn(m) for m in prompt):
        turns = [dict(m) for m in prompt]
    else:
        raise origin.error("prompt must be text or a list of {role, content} turns", "prompt")
    if turns[-1]["role"] != "user":
        raise origin.error("the prompt must end with a user turn for the policy to answer", "prompt")
    return {**{k: v for k, v in row.items() if k != "prompt"}, "prompt": turns}


def _from_chat(row: Mapping[str, Any], fmt: str, origin: Origin, column: str) -> dict[str, Any]:
    example = to_example(row, fmt, origin)
    if example.text is not None:
        raise origin.error("the text format has no prompt to answer; use prompts or a chat format", "text")
    messages = [dict(m) for m in example.messages]
    if not messages or messages[-1]["role"] != "assistant":
        raise origin.error("a chat row for RL ends with the assistant's reference answer", "messages")
    prompt, answer = messages[:-1], messages[-1]["content"]
    if not prompt or prompt[-1]["role"] != "user":
        raise origin.error("the turn before the last answer must be a user turn", "messages")
    return {"prompt": prompt, column: answer}


def _is_turn(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("role"), str) and isinstance(value.get("content"), str)


def _same_columns(rows: list[dict[str, Any]], file: str) -> None:
    """TRL batches the rows' columns for the rewards: every row needs the same ones."""
    first = set(rows[0])
    for row in rows[1:]:
        if set(row) != first:
            missing = sorted(first ^ set(row))[0]
            raise DataError(f"rows differ in their columns ('{missing}'); every prompt row needs the same", file=file)
