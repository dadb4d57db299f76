"""The pre-flight check of a classification task: the labelled rows instead of chat turns and stop tokens."""

from __future__ import annotations

from typing import Any

from lora_tune.check.report import CheckResult, PreflightReport
from lora_tune.recipe.schema import Recipe
from lora_tune.tasks.classification.data import load_splits


def preflight_report(recipe: Recipe, tokenizer: Any) -> Any:
    """`lora-tune check` for a classification recipe: every row has text and a known label (a DataError names the
    first bad one); reports the label counts and how many texts max_length truncates."""
    from collections import Counter

    train, valid = load_splits(recipe)
    counts = Counter(recipe.task.labels[r["label"]] for r in train)
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in train])["input_ids"]]
    limit = recipe.training.max_length
    truncated = sum(n > limit for n in lengths) if limit else 0
    checks = [
        CheckResult(
            "labels", "pass", "train rows per label: " + ", ".join(f"{k} {counts[k]}" for k in recipe.task.labels)
        ),
        CheckResult(
            "truncation",
            "warn" if truncated else "pass",
            f"{truncated} of {len(lengths)} texts are longer than max_length {limit}",
            fix="raise training.max_length" if truncated else None,
            count=truncated,
        ),
    ]
    if min(counts[k] for k in recipe.task.labels) == 0:
        missing = [k for k in recipe.task.labels if counts[k] == 0]
        checks.append(CheckResult("labels-present", "fail", f"no training rows for {', '.join(missing)}"))
    sources = {d.path: {"rows": len(train) + len(valid), "checked": len(train) + len(valid)} for d in recipe.datasets}
    return PreflightReport(
        checks=checks,
        rows=len(train),
        sources=sources,
        tokens=sum(lengths),
        trained_tokens=0,
        stop_tokens=[],
        generation_stop_tokens=None,
        generation_config="not used by classification",
        chat_template_sha256="",
        max_length=limit,
        longest_example=max(lengths, default=0),
    )
