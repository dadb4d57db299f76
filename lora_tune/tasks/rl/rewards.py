"""The rewards of an online RL run: built-in checkers and the user's own functions, as TRL calls them.

TRL's online trainers call each reward function with the batch's prompts and completions (and every other column of
the rows as keyword arguments) and expect one float per completion. The built-ins:
- `answer`: 1.0 when the completion's final answer equals the row's reference answer (the `column`), else 0.0. The
  final answer is the text after the last `</think>` (reasoning is not the answer), then the last `\\boxed{...}` or
  what follows the last `####` when there is one; both sides are compared case-folded with outer whitespace, quotes
  and trailing punctuation removed, and as numbers when both read as numbers (`1,000` = `1000.0`).
- `format`: 1.0 when the whole completion matches the recipe's regular expression (default: a think block, then an
  answer), else 0.0.
- `length`: 1.0 up to `target` completion tokens, then target / length: a gentle push towards short answers.
A `function: file.py:name` reward is loaded from the user's file (their code, named in their recipe).

`Scored` wraps each reward so the run can record what it gave: the last call's scores, read by the completions log.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError
from lora_tune.recipe.schema import THINK_FORMAT, RewardConfig

RewardFunction = Callable[..., list[float]]
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_STRIPPED = " \t\n\"'`.,;:!?*"


class RewardError(LoraTuneError):
    """A reward function that cannot be loaded or does not behave as TRL needs."""


def completion_text(completion: Any) -> str:
    """The completion as text: TRL passes a string, or for conversational prompts a list with one assistant turn."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def final_answer(text: str) -> str:
    """The answer a completion commits to: after the reasoning, the boxed or '####' answer when there is one."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1]
    if "####" in text:
        return text.rsplit("####", 1)[1]
    return text


def normalize(answer: str) -> str:
    return " ".join(answer.strip(_STRIPPED).casefold().split())


def _as_number(text: str) -> float | None:
    cleaned = text.strip(_STRIPPED).replace("$", "").strip()
    if not _NUMBER.fullmatch(cleaned):
        return None
    return float(cleaned.replace(",", ""))


def answers_match(completion: str, reference: Any) -> bool:
    """Whether the completion's final answer is the reference (text, or numbers equal as numbers)."""
    said, expected = final_answer(completion), final_answer(str(reference))
    said_number, expected_number = _as_number(said), _as_number(expected)
    if said_number is not None and expected_number is not None:
        return math.isclose(said_number, expected_number, rel_tol=1e-9, abs_tol=1e-9)
    return normalize(said) == normalize(expected) and bool(normalize(expected))


def answer_reward(column: str) -> RewardFunction:
    def answer(completions: Sequence[Any], **columns: Any) -> list[float]:
        if column not in columns:
            raise RewardError(f"the answer reward reads the column '{column}', which the rows do not have")
        references = columns[column]
        return [float(answers_match(completion_text(c), r)) for c, r in zip(completions, references, strict=True)]

    return answer


def format_reward(pattern: str | None) -> RewardFunction:
    compiled = re.compile(pattern or THINK_FORMAT, re.DOTALL)

    def format(completions: Sequence[Any], **_: Any) -> list[float]:  # noqa: A001 - the reward's name in metrics
        return [float(compiled.fullmatch(completion_text(c)) is not None) for c in completions]

    return format


def length_reward(target: int) -> RewardFunction:
    def length(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None, **_: Any):
        counts = [len(ids) for ids in completion_ids] if completion_ids is not None else None
        counts = counts or [len(completion_text(c).split()) for c in completions]
        return [1.0 if n <= target else target / n for n in counts]

    return length


def load_function(spec: str) -> RewardFunction:
    """`file.py:name` from the user's file, which is run as a module (it is their code, named in their recipe)."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise RewardError(f"rl.rewards: function '{spec}': no file {path}")
    module_name = f"lora_tune_reward_{path.stem}_{abs(hash(path.resolve()))}"
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    if spec_obj is None or spec_obj.loader is None:
        raise RewardError(f"rl.rewards: function '{spec}': {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module  # a reward the trainer pickles (several processes) must be importable
    try:
        spec_obj.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import: say where, in one line
        raise RewardError(f"rl.rewards: importing {path} failed: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"rl.rewards: {path} has no function '{name}'")
    return function


def build_reward(cfg: RewardConfig) -> RewardFunction:
    if cfg.function is not None:
        return load_function(cfg.function)
    if cfg.name == "answer":
        return answer_reward(cfg.column)
    if cfg.name == "format":
        return format_reward(cfg.pattern)
    return length_reward(cfg.target or 1)


class Scored:
    """A reward as TRL calls it, keeping the scores of its last call (for the completions log and the checks).
    Its `__name__` is the reward's label, which TRL uses in the metric names (`rewards/<label>/mean`)."""

    def __init__(self, label: str, function: RewardFunction, on_scored: Callable[[Scored, dict], None] | None):
        self.__name__ = label
        self.function, self.on_scored = function, on_scored
        self.last: list[float] = []

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        scores = self.function(prompts=prompts, completions=completions, **kwargs)
        self.last = [float("nan") if s is None else float(s) for s in scores]
        if self.on_scored is not None:
            self.on_scored(self, {"prompts": prompts, "completions": completions, **kwargs})
        return scores


def build_rewards(
    configs: Sequence[RewardConfig], on_scored: Callable[[Scored, dict], None] | None = None
) -> list[Scored]:
    """The recipe's rewards, in order, with unique labels (a second `answer` becomes `answer_2`)."""
    seen: dict[str, int] = {}
    rewards = []
    for cfg in configs:
        seen[cfg.label] = seen.get(cfg.label, 0) + 1
        label = cfg.label if seen[cfg.label] == 1 else f"{cfg.label}_{seen[cfg.label]}"
        rewards.append(Scored(label, build_reward(cfg), on_scored))
    return rewards


def reward_weights(configs: Sequence[RewardConfig]) -> list[float]:
    return [cfg.weight for cfg in configs]
