"""Cleaning and splitting of canonical examples: empty turns, duplicates, ratio splits, mixing weights.

Pure Python on `Example`s, before anything is tokenized. The guarantee the splitter keeps: an example (compared by
its dedupe key) never lands in two splits, even when duplicates are kept.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

from lora_tune.data.formats import Example

T = TypeVar("T")
Dedupe = Literal["exact", "normalized", "none"]

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def strip_empty(example: Example) -> Example | None:
    """The example without empty system turns, or None when a user/assistant turn (or the text) is blank.

    A blank user or assistant turn cannot just be removed (the turns would no longer alternate), so the example goes.
    An assistant turn that only calls a tool is not blank; a blank tool result is kept (a tool may return nothing).
    """
    if example.text is not None:
        return example if example.text.strip() else None
    kept = [m for m in example.messages if m["role"] != "system" or m["content"].strip()]
    for message in kept:
        if message["role"] in ("user", "assistant") and not message["content"].strip():
            if not message.get("tool_calls"):
                return None
    if len(kept) == len(example.messages):
        return example
    return Example(kept, example.tools, example.text)


def exact_key(example: Example) -> str:
    return json.dumps([example.messages, example.tools, example.text], sort_keys=True, ensure_ascii=False)


def normalized_key(example: Example) -> str:
    """Text of the example ignoring case, punctuation and whitespace (roles and tool definitions still count)."""
    if example.text is not None:
        return _normalize(example.text)
    parts = [f"{m['role']}:{_normalize(m['content'])}" for m in example.messages]
    calls = [json.dumps(m.get("tool_calls"), sort_keys=True) for m in example.messages if m.get("tool_calls")]
    return "\x1f".join([*parts, *calls, json.dumps(example.tools, sort_keys=True)])


def _normalize(text: str) -> str:
    return _SPACE.sub(" ", _PUNCTUATION.sub("", text.lower())).strip()


def key_function(dedupe: Dedupe) -> Callable[[Example], str]:
    """What makes two examples the same: normalized text for `normalized`, else the exact example."""
    return normalized_key if dedupe == "normalized" else exact_key


def split_counts(total: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    """(train, validation, test) counts of `total` items; a non-zero share gets at least one item."""
    validation = max(1, round(total * ratios[1])) if ratios[1] > 0 else 0
    test = max(1, round(total * ratios[2])) if ratios[2] > 0 else 0
    return total - validation - test, validation, test


def split_groups(items: Sequence[T], keys: Sequence[str], counts: tuple[int, int]) -> tuple[list[T], list[T], list[T]]:
    """Items (already shuffled) split into train, validation and test, keeping items with the same key together.

    `counts` are the validation and test sizes in groups (distinct keys): groups are taken from the front, first
    for validation, then for test; the rest is train.
    """
    groups: dict[str, list[T]] = {}
    for item, key in zip(items, keys, strict=True):
        groups.setdefault(key, []).append(item)
    ordered = list(groups.values())
    validation_groups, test_groups = counts
    validation = [x for g in ordered[:validation_groups] for x in g]
    test = [x for g in ordered[validation_groups : validation_groups + test_groups] for x in g]
    train = [x for g in ordered[validation_groups + test_groups :] for x in g]
    return train, validation, test


def hold_out(rows: Sequence[T], share: float, seed: int) -> tuple[list[T], list[T]]:
    """(validation, train): a seeded `share` of the rows (at least one) held out, the rest for training. The rows
    of the preference and RL tasks, which are not deduplicated examples (SFT splits with split_groups)."""
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    held = max(1, round(len(shuffled) * share))
    return shuffled[:held], shuffled[held:]


def apply_weight(items: Sequence[T], weight: float, rng: random.Random) -> list[T]:
    """round(weight x len(items)) items: whole copies for the integer part, a seeded sample for the rest."""
    if weight == 1.0 or not items:
        return list(items)
    target = max(1, round(weight * len(items)))
    copies, rest = divmod(target, len(items))
    return list(items) * copies + rng.sample(list(items), rest)
