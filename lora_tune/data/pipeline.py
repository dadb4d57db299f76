"""From a recipe's dataset entries to tokenized, assistant-masked train and validation splits.

Steps: load and normalise every source (all rows are validated before any is tokenized), mix the training sources
with a seeded shuffle, hold out validation rows (before tokenizing, so they never reach training), then tokenize,
mask and truncate each split. The result has two columns, `input_ids` and `labels` (IGNORE_INDEX on every token
that is not assistant content), which TRL's SFTTrainer uses as they are.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_tune.config import DatasetConfig, Recipe
from lora_tune.data.formats import Conversation, normalize_rows
from lora_tune.data.masking import TemplateError, TrainOn, tokenize_conversation
from lora_tune.data.sources import load_rows
from lora_tune.errors import DataError

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

COLUMNS = ("input_ids", "labels")


@dataclass(frozen=True)
class SplitStats:
    """Counts for one split; token counts are over the examples kept (after truncation)."""

    rows: int  # examples kept
    dropped: int  # examples dropped because truncation left no assistant token
    truncated: int  # kept examples that were cut to max_length
    tokens: int
    trained_tokens: int

    @property
    def trained_share(self) -> float:
        return self.trained_tokens / self.tokens if self.tokens else 0.0

    def describe(self) -> str:
        text = f"{self.rows:,} rows, {self.tokens:,} tokens, {self.trained_share:.1%} trained"
        if self.truncated or self.dropped:
            text += f" ({self.truncated:,} truncated, {self.dropped:,} dropped: no assistant token left)"
        return text


@dataclass(frozen=True)
class DataStats:
    train: SplitStats
    validation: SplitStats | None = None

    def summary(self) -> str:
        lines = [f"train: {self.train.describe()}"]
        if self.validation is not None:
            lines.append(f"validation: {self.validation.describe()}")
        return "\n".join(lines)


@dataclass(frozen=True)
class PreparedData:
    datasets: DatasetDict  # "train", plus "validation" when the recipe has validation data
    stats: DataStats


@dataclass(frozen=True)
class _Record:
    """A conversation and where it came from, so errors found while tokenizing can name the row."""

    messages: Conversation
    file: str
    row: int


def build_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized, assistant-masked `train` (and `validation`) splits of the recipe's data, with their stats."""
    from datasets import Dataset, DatasetDict

    train = _load(recipe.datasets)
    random.Random(recipe.training.seed).shuffle(train)  # mixes several sources; also the seeded validation split
    validation: list[_Record] | None = None
    if recipe.eval_datasets:
        validation = _load(recipe.eval_datasets)
    elif recipe.val_size > 0:
        held_out = _held_out_count(len(train), recipe.val_size, recipe.datasets)
        validation, train = train[:held_out], train[held_out:]

    max_length = recipe.training.max_length
    splits: dict[str, Dataset] = {}
    stats: dict[str, SplitStats] = {}
    for name, records in (("train", train), ("validation", validation)):
        if records is None:
            continue
        columns, stats[name] = _tokenize(records, tokenizer, max_length, name, recipe.training.train_on)
        splits[name] = Dataset.from_dict(columns)
    return PreparedData(DatasetDict(splits), DataStats(**stats))


def _load(configs: Sequence[DatasetConfig]) -> list[_Record]:
    records: list[_Record] = []
    for cfg in configs:
        conversations = normalize_rows(load_rows(cfg), cfg)
        records += [_Record(c, cfg.path, i) for i, c in enumerate(conversations, start=1)]
    return records


def _held_out_count(total: int, val_size: float, configs: Sequence[DatasetConfig]) -> int:
    held_out = max(1, round(total * val_size))
    if held_out >= total:
        raise DataError(
            f"val_size {val_size} of {total} rows leaves no training rows; lower val_size or add data",
            file=", ".join(cfg.path for cfg in configs),
        )
    return held_out


def _tokenize(
    records: Sequence[_Record],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    split: str,
    train_on: TrainOn = "assistant",
) -> tuple[dict[str, list[list[int]]], SplitStats]:
    columns: dict[str, list[list[int]]] = {name: [] for name in COLUMNS}
    dropped = truncated = tokens = trained = 0
    for record in records:
        try:
            example = tokenize_conversation(record.messages, tokenizer, max_length, train_on=train_on)
        except TemplateError as e:
            raise DataError(str(e), file=record.file, row=record.row) from e
        if example.num_trained == 0:
            dropped += 1
            continue
        columns["input_ids"].append(example.input_ids)
        columns["labels"].append(example.labels)
        truncated += example.truncated
        tokens += len(example.input_ids)
        trained += example.num_trained
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows: truncation to max_length=%s left no assistant token",
            split,
            dropped,
            len(records),
            max_length,
        )
    if not columns["input_ids"]:
        files = ", ".join(dict.fromkeys(r.file for r in records))
        raise DataError(
            f"no {split} rows left: truncation to max_length={max_length} removed every assistant token; "
            "raise training.max_length",
            file=files,
        )
    return columns, SplitStats(len(columns["input_ids"]), dropped, truncated, tokens, trained)
