"""The pre-flight check of an online RL run (grpo, rloo): its prompts, and its rewards called before training.

Every row is read and checked on load (tasks/rl/data.py). Here:
- each reward is built (a `function:` file that cannot be imported fails here) and called on the first rows with
  sampled completions: the row's reference answer, the reference after a think block, an empty answer, a wrong one
  and a long one. A reward that raises, returns the wrong count or a value that is not a finite number (None is
  allowed: TRL reads it as "does not apply"), or gives every sampled completion the same value (it cannot tell them
  apart, so it teaches nothing), fails in one line naming the reward and the row;
- each prompt is rendered with the run's chat template and its generation prompt: a prompt that leaves no room for
  rl.max_completion_length inside training.max_length fails, counted, naming the first;
- generation needs a token to stop at (the end-of-turn token, as SFT's check reads it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lora_tune.check.report import CheckResult, PreflightReport
from lora_tune.data.sources import Origin
from lora_tune.model.stops import config_stops, read_generation_stops
from lora_tune.recipe.schema import Recipe
from lora_tune.tasks.rl.data import load_prompt_splits, prompt_rows_with_origins, reference_column
from lora_tune.tasks.rl.rewards import RewardError, Scored, build_rewards

SAMPLED_ROWS = 4  # rows each reward is called on


def rl_report(recipe: Recipe, tokenizer: Any) -> PreflightReport:
    """`lora-tune check` (and train's pre-flight step) for an online RL recipe."""
    column = reference_column(recipe)
    located = [pair for s in (*recipe.datasets, *recipe.eval_datasets) for pair in prompt_rows_with_origins(s, column)]
    origins, rows = [o for o, _ in located], [r for _, r in located]
    prompt_lengths = [len(prompt_ids(tokenizer, row["prompt"])) for row in rows]
    room, limit = recipe.rl.max_completion_length, recipe.training.max_length
    too_long = [i for i, n in enumerate(prompt_lengths) if limit and n + room > limit]
    generation_stops, source = read_generation_stops(recipe.model)
    stop_ids = sorted(set(config_stops(tokenizer, generation_stops)))
    checks = [
        *reward_checks(recipe, tokenizer, located[:SAMPLED_ROWS]),
        _prompt_room(too_long, origins, prompt_lengths, room, limit),
        CheckResult("stop", "pass", f"generation stops at {', '.join(tokenizer.convert_ids_to_tokens(stop_ids))}")
        if stop_ids
        else CheckResult("stop", "fail", f"nothing stops generation: {source} lists no eos token id",
                         fix="use a chat template that closes the assistant turn (model.chat_template)"),
    ]  # fmt: skip
    per_file: dict[str, int] = {}
    for origin in origins:
        per_file[origin.file] = per_file.get(origin.file, 0) + 1
    train_rows = len(load_prompt_splits(recipe).train)
    longest = max(prompt_lengths, default=0) + room
    return PreflightReport(
        checks=checks,
        rows=train_rows,
        sources={
            d.path: {"rows": per_file.get(d.path, 0), "checked": per_file.get(d.path, 0)} for d in recipe.datasets
        },
        tokens=sum(prompt_lengths),
        trained_tokens=0,  # what is trained is sampled during the run
        stop_tokens=tokenizer.convert_ids_to_tokens(stop_ids),
        generation_stop_tokens=tokenizer.convert_ids_to_tokens(generation_stops) if generation_stops else None,
        generation_config=source,
        chat_template_sha256="",
        max_length=limit,
        longest_example=longest,
        online=True,
    )


def prompt_ids(tokenizer: Any, prompt: list[dict[str, Any]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _prompt_room(too_long: list[int], origins: list[Origin], lengths: list[int], room: int, limit: int | None):
    what = f"prompts leave less than rl.max_completion_length ({room}) tokens within training.max_length ({limit})"
    if not too_long:
        return CheckResult("prompt-room", "pass", f"0 of {len(origins)} {what}")
    first = origins[too_long[0]]
    longest = max(lengths[i] for i in too_long)
    return CheckResult(
        "prompt-room", "fail", f"{len(too_long)} of {len(origins)} {what}; the longest prompt has {longest} tokens",
        fix="raise training.max_length, lower rl.max_completion_length or shorten these prompts",
        count=len(too_long), file=first.file, row=first.number,
    )  # fmt: skip


def sampled_completions(row: dict[str, Any], column: str) -> list[str]:
    """Answers a policy might give to `row`: right (when the row has a reference), reasoned, empty, wrong, long."""
    reference = str(row.get(column, "")).strip()
    texts = ["", "I do not know.", "no " * 200]
    if reference:
        texts = [reference, f"<think>\nLet me work it out.\n</think>\n{reference}", *texts]
    return texts


def reward_checks(
    recipe: Recipe, tokenizer: Any, located: Sequence[tuple[Origin, dict[str, Any]]]
) -> list[CheckResult]:
    """One check per reward: built, called on sampled completions of the first rows, and varying among them."""
    try:
        rewards = build_rewards(recipe.rl.rewards)
    except RewardError as exc:
        return [CheckResult("reward-load", "fail", str(exc), fix="fix the file or rl.rewards")]
    column = reference_column(recipe)
    return [_check_reward(reward, tokenizer, located, column) for reward in rewards]


def _check_reward(
    reward: Scored, tokenizer: Any, located: Sequence[tuple[Origin, dict[str, Any]]], column: str
) -> CheckResult:
    name = f"reward:{reward.__name__}"
    seen: set[float] = set()
    for origin, row in located:
        texts = sampled_completions(row, column)
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {k: [v] * len(texts) for k, v in row.items() if k != "prompt"}
        try:
            scores = reward(
                prompts=[row["prompt"]] * len(texts),
                completions=completions,
                completion_ids=[tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                trainer_state=None,
                log_extra=lambda *a, **k: None,
                log_metric=lambda *a, **k: None,
                **columns,
            )
        except Exception as exc:  # noqa: BLE001 - the user's function failing: name it, its row and why
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return _fail(name, f"raised {type(exc).__name__}: {why}", origin)
        scores = list(scores) if scores is not None else []
        if len(scores) != len(texts):
            return _fail(name, f"returned {len(scores)} values for {len(texts)} completions", origin)
        bad = [s for s in scores if s is not None and not (isinstance(s, (int, float)) and math.isfinite(s))]
        if bad:
            return _fail(name, f"returned {bad[0]!r}; a reward is a finite number (or None: does not apply)", origin)
        seen.update(float(s) for s in scores if s is not None)
    if len(seen) < 2:
        value = f"{next(iter(seen)):g}" if seen else "None"
        first = located[0][0] if located else None
        return _fail(
            name, f"gave {value} to every sampled completion of the first {len(located)} rows: it cannot tell "
            "completions apart, so it teaches nothing", first,
        )  # fmt: skip
    return CheckResult(name, "pass", f"varies over sampled completions of {len(located)} rows ({len(seen)} values)")


def _fail(name: str, message: str, origin: Origin | None) -> CheckResult:
    return CheckResult(
        name, "fail", message, fix="fix the reward function or its rl.rewards entry", count=1,
        file=origin.file if origin else None, row=origin.number if origin else None,
    )  # fmt: skip
