"""Labelled rows of a classification task: {text_column, label_column} rows checked against task.labels, split, and the
held-out split written for `lora-tune eval`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lora_tune.data.sources import load_rows
from lora_tune.errors import DataError
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir, write_text_atomic


def encode_rows(recipe: Recipe, rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """{text, label name or id} -> {text, label id}; a missing column or an unknown label names the file and row."""
    task = recipe.task
    ids = {name: i for i, name in enumerate(task.labels)}
    out = []
    for number, row in enumerate(rows, start=1):
        text, label = row.get(task.text_column), row.get(task.label_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError("expected non-empty text", file=source, row=number, field=task.text_column)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(task.labels):
            label = task.labels[label]  # datasets that store class ids (e.g. imdb's 0/1) in task.labels' order
        if str(label) not in ids:
            raise DataError(
                f"label {label!r} is not one of task.labels ({', '.join(task.labels)}) nor a class id below "
                f"{len(task.labels)}",
                file=source,
                row=number,
                field=task.label_column,
            )
        out.append({"text": text, "label": ids[str(label)]})
    return out


def load_splits(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and validation rows (validation from eval_datasets, or val_size held out under the seed)."""
    train = [r for d in recipe.datasets for r in encode_rows(recipe, load_rows(d), d.path)]
    valid = [r for d in recipe.eval_datasets for r in encode_rows(recipe, load_rows(d), d.path)]
    if recipe.val_size > 0:
        random.Random(recipe.training.seed).shuffle(train)
        cut = max(1, round(len(train) * recipe.val_size))
        train, valid = train[cut:], train[:cut]
    return train, valid


def write_labelled_test_split(recipe: Recipe, run: RunDir) -> Path | None:
    """The recipe's test_datasets as the run's test.jsonl ({text_column, label_column} rows), for `lora-tune eval`."""
    task = recipe.task
    rows = [r for d in recipe.test_datasets for r in encode_rows(recipe, load_rows(d), d.path)]
    if not rows:
        return None
    path = run.test_split
    lines = [json.dumps({task.text_column: r["text"], task.label_column: task.labels[r["label"]]}) for r in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
