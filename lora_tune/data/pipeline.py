"""From a recipe's dataset entries to tokenized, assistant-masked train and validation splits (and a test split).

Steps, all before any token is trained on:
1. read every source (bad rows raise, or are skipped and counted with `data.on_bad_rows: skip`) and convert each
   row to the canonical form (`formats`); a row with more text than `sources.MAX_ROW_CHARS` characters is a bad
   row (`sources.RowLimit`: tokenizing it would endanger memory), refused before it is tokenized;
2. clean: drop examples with an empty turn, then duplicates (`data.dedupe`), keeping the copy in the most held-out
   split (test, then validation, then train), so an example is never in two splits;
3. split: explicit `eval_datasets` / `test_datasets`, or a seeded ratio split of the training sources
   (`data.split`, or the older `val_size`); identical examples always go to the same split;
4. mix: each training source's rows are repeated or sampled by its `weight`, then all are shuffled with the seed;
5. tokenize and mask train and validation in batches (`datasets.map`, `num_proc` workers); cut plain-text rows
   longer than `max_length` into pieces of `max_length` tokens, each a training row; render reasoning templates with
   `data.thinking` (a conversation such a template renders differently once later turns follow is one row per
   assistant turn); drop rows left with no trained token by truncation, or over `max_length` when
   `data.too_long: drop`; stop below `data.min_rows`; record on the tokenizer the enable_thinking inference should
   use (`inference_thinking`), saved with the run's adapter.
The test split stays canonical (it is for generation, not loss): `write_test_split` saves it as JSON Lines.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.data import masking
from lora_tune.data.cleaning import apply_weight, key_function, split_counts, split_groups, strip_empty
from lora_tune.data.formats import Example, has_reasoning, map_columns, resolve_format, to_example
from lora_tune.data.masking import TemplateError, Thinking, TrainOn, record_thinking, tokenize_dataset
from lora_tune.data.sources import DEFAULT_ROW_LIMIT, Origin, RowLimit, read_source, text_chars
from lora_tune.data.stats import DataStats, DropStats, SourceStats, SplitStats
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DataConfig, DatasetConfig, Recipe
from lora_tune.run.layout import RunDir, write_text_atomic

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["DataStats", "DropStats", "PreparedData", "SourceStats", "SplitStats", "build_datasets", "load_source"]

COLUMNS = ("input_ids", "labels")
SPLITS = ("train", "validation", "test")
BAD_ROWS_SHOWN = 5  # bad rows named in the report when they are skipped
PARALLEL_FROM_ROWS = 10_000  # below this, worker processes cost more than they save
CACHE_FROM_ROWS = 1_000  # smaller splits tokenize in well under a second: not worth a cache file


@dataclass(frozen=True)
class PreparedData:
    datasets: DatasetDict  # "train", plus "validation" when the recipe has validation data
    stats: DataStats
    test: list[Example] = field(default_factory=list)  # the test split, canonical (for `lora-tune eval`)


@dataclass(frozen=True)
class _Record:
    """A canonical example, where it came from (to name the row in errors) and which source it belongs to."""

    example: Example
    origin: Origin
    source: int  # index into the recipe's `datasets` (training sources); -1 for validation/test sources

    @property
    def file(self) -> str:
        return self.origin.file

    @property
    def row(self) -> int:
        return self.origin.number


@dataclass
class _Loaded:
    records: dict[str, list[_Record]]
    sources: list[SourceStats]
    bad: list[DataError]


def build_datasets(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Tokenized, assistant-masked `train` (and `validation`) splits of the recipe's data, the test split, stats."""
    from datasets import DatasetDict

    data, seed = recipe.data, recipe.training.seed
    loaded = _load_all(recipe)
    records, drops = _clean(loaded, data)
    records = _split(records, recipe, key_function(data.dedupe))
    records["train"] = _mix(records["train"], recipe.datasets, seed)

    splits: dict[str, Dataset] = {}
    stats: dict[str, SplitStats] = {}
    for name in ("train", "validation"):
        if name == "validation" and not recipe.has_validation:
            continue
        splits[name], stats[name] = _tokenize(records[name], tokenizer, recipe, name)
    if stats["train"].rows < data.min_rows:
        raise DataError(
            f"only {stats['train'].rows:,} training rows survive cleaning and truncation, fewer than data.min_rows "
            f"({data.min_rows:,}); dropped before tokenizing: {drops.describe()}",
            file=_files(recipe.datasets),
        )
    record_thinking(tokenizer, inference_thinking(data.thinking, [r.example for r in records["train"]]))
    data_stats = DataStats(
        train=stats["train"],
        validation=stats.get("validation"),
        test_rows=len(records["test"]),
        sources=tuple(loaded.sources),
        drops=drops,
    )
    return PreparedData(DatasetDict(splits), data_stats, [r.example for r in records["test"]])


def inference_thinking(thinking: Thinking, train: Sequence[Example]) -> bool:
    """The enable_thinking a run's model is asked with at inference: on or off as data.thinking says; for auto, on
    when a training row has reasoning (the model has learnt to think), off when none has (it answers at once)."""
    if thinking != "auto":
        return thinking == "on"
    return any(has_reasoning(example.messages) for example in train)


def write_test_split(prepared: PreparedData, run: RunDir) -> Path | None:
    """The test split as `test.jsonl` (messages rows, or text rows) in the run directory; None when there is none."""
    if not prepared.test:
        return None
    lines = []
    for example in prepared.test:
        row = {"text": example.text} if example.text is not None else {"messages": example.messages}
        if example.tools:
            row["tools"] = example.tools
        lines.append(json.dumps(row, ensure_ascii=False))
    path = run.test_split
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def load_source(
    cfg: DatasetConfig, *, skip_bad: bool = False, row_limit: RowLimit = DEFAULT_ROW_LIMIT
) -> tuple[list[tuple[Origin, Example]], list[DataError]]:
    """A source's rows converted to canonical examples, and (with skip_bad) the errors of the rows skipped.

    An example with more than `row_limit.chars` characters of text (contents, text, tools) is a bad row.
    """
    raw = read_source(cfg, skip_bad=skip_bad, row_limit=row_limit)
    bad = list(raw.bad)
    if not raw.rows:
        raise DataError("has no rows" + (f" left after {len(bad)} bad rows" if bad else ""), file=cfg.path)
    origin, first = raw.rows[0]
    fmt = resolve_format(cfg, map_columns(first, cfg.columns, origin))
    examples: list[tuple[Origin, Example]] = []
    for origin, row in raw.rows:
        try:
            mapped = map_columns(row, cfg.columns, origin)
            example = to_example(mapped, fmt, origin, cfg.system_prompt)
            size = text_chars([example.messages, example.tools, example.text])
            if size > row_limit.chars:
                raise origin.error(row_limit.refusal(f"has {size:,} characters of text"))
            examples.append((origin, example))
        except DataError as e:
            if not skip_bad:
                raise
            bad.append((origin, e))
    bad.sort(key=lambda pair: pair[0].number)  # unreadable and unconvertible rows, in file order
    return examples, [e for _, e in bad]


def _load_all(recipe: Recipe) -> _Loaded:
    skip = recipe.data.on_bad_rows == "skip"
    loaded = _Loaded({name: [] for name in SPLITS}, [], [])
    sections = (("train", recipe.datasets), ("validation", recipe.eval_datasets), ("test", recipe.test_datasets))
    for split, configs in sections:
        for index, cfg in enumerate(configs):
            examples, bad = load_source(cfg, skip_bad=skip)
            source = index if split == "train" else -1
            loaded.records[split] += [_Record(example, origin, source) for origin, example in examples]
            loaded.sources.append(SourceStats(split, cfg.path, len(examples), len(bad)))
            loaded.bad += bad
    if loaded.bad:
        shown = "; ".join(str(e) for e in loaded.bad[:BAD_ROWS_SHOWN])
        logger.warning("skipped %d bad rows (data.on_bad_rows: skip), first: %s", len(loaded.bad), shown)
    return loaded


def _clean(loaded: _Loaded, data: DataConfig) -> tuple[dict[str, list[_Record]], DropStats]:
    """Drop examples with empty turns, then duplicates, keeping the copy in the most held-out split."""
    key = key_function(data.dedupe)
    seen: dict[str, str] = {}  # key -> split of the kept copy
    empty = duplicates = held_out = 0
    cleaned: dict[str, list[_Record]] = {name: [] for name in SPLITS}
    for split in ("test", "validation", "train"):
        for record in loaded.records[split]:
            example = strip_empty(record.example)
            if example is None:
                empty += 1
                continue
            k = key(example)
            if k in seen and (data.dedupe != "none" or seen[k] != split):
                if seen[k] == split:
                    duplicates += 1
                else:
                    held_out += 1
                continue
            seen.setdefault(k, split)
            cleaned[split].append(_Record(example, record.origin, record.source))
    bad = tuple(_short(e) for e in loaded.bad[:BAD_ROWS_SHOWN])
    return cleaned, DropStats(len(loaded.bad), bad, empty, duplicates, held_out)


def _split(records: dict[str, list[_Record]], recipe: Recipe, key) -> dict[str, list[_Record]]:
    """Hold out validation and test rows from the (seeded, shuffled) training pool by ratio, when asked."""
    train = list(records["train"])
    random.Random(recipe.training.seed).shuffle(train)  # mixes several sources; also the seeded ratio split
    ratios = recipe.data.split_ratios
    if ratios is None and recipe.val_size > 0:
        ratios = (1 - recipe.val_size, recipe.val_size, 0.0)
    if ratios is None:
        return {**records, "train": train}
    groups = len({key(r.example) for r in train})
    kept, validation, test = split_counts(groups, ratios)
    if kept < 1:
        raise DataError(
            f"{_ratio_text(recipe)} of {groups:,} rows leaves no training rows; lower the held-out shares or add data",
            file=_files(recipe.datasets),
        )
    train, held_validation, held_test = split_groups(train, [key(r.example) for r in train], (validation, test))
    return {
        "train": train,
        "validation": records["validation"] + held_validation,
        "test": records["test"] + held_test,
    }


def _ratio_text(recipe: Recipe) -> str:
    if recipe.data.split_ratios is None:
        return f"val_size {recipe.val_size}"
    return "data.split " + ":".join(f"{r:g}" for r in recipe.data.split_ratios)


def _mix(train: list[_Record], configs: Sequence[DatasetConfig], seed: int) -> list[_Record]:
    """Each training source's rows repeated or sampled by its weight; shuffled again when any weight is not 1."""
    if all(cfg.weight == 1.0 for cfg in configs):
        return train
    rng = random.Random(seed + 1)
    mixed: list[_Record] = []
    for index, cfg in enumerate(configs):
        mixed += apply_weight([r for r in train if r.source == index], cfg.weight, rng)
    rng.shuffle(mixed)
    return mixed


def _tokenize(
    records: Sequence[_Record], tokenizer: PreTrainedTokenizerBase, recipe: Recipe, split: str
) -> tuple[Dataset, SplitStats]:
    from datasets import Dataset

    files = _files(recipe.datasets if split == "train" else recipe.eval_datasets or recipe.datasets)
    if not records:
        raise DataError(f"no {split} rows left after cleaning", file=files)
    max_length, train_on, thinking = recipe.training.max_length, recipe.training.train_on, recipe.data.thinking
    table = Dataset.from_dict(
        {
            "messages": [json.dumps(r.example.messages, ensure_ascii=False) for r in records],
            "tools": [json.dumps(r.example.tools) if r.example.tools else None for r in records],
            "text": [r.example.text for r in records],
        }
    )
    how = (max_length, train_on, thinking)
    tokenized = _map(table, tokenizer, how, _num_proc(recipe.data, len(records)), records, files)
    # Whole Arrow columns as Python lists: indexing a `datasets` column row by row is slow. A plain text cut into
    # pieces is several rows from here on, so rows are counted in `tokenized`, not in `records`.
    trained = tokenized.data.column("num_trained").to_pylist()
    truncated = tokenized.data.column("truncated").to_pylist()
    pieces = tokenized.data.column("piece").to_pylist()
    drop_long = recipe.data.too_long == "drop"
    rows = range(len(trained))
    keep = [i for i in rows if trained[i] > 0 and not (drop_long and truncated[i])]
    too_long = sum(1 for i in rows if drop_long and truncated[i])
    dropped = sum(1 for i in rows if trained[i] == 0 and not (drop_long and truncated[i]))
    if dropped:
        logger.warning(
            "%s: dropped %d of %d rows: truncation to max_length=%s left no assistant token",
            split,
            dropped,
            len(trained),
            max_length,
        )
    if not keep:
        raise DataError(
            f"no {split} rows left: truncation to max_length={max_length} removed every assistant token"
            + (" (or data.too_long: drop removed them)" if drop_long else "")
            + "; raise training.max_length",
            file=files,
        )
    if len(keep) < len(trained):
        tokenized = tokenized.select(keep)
    import pyarrow.compute as pc

    cut_texts = pieces.count(1)  # each text cut in two or more has exactly one second piece
    stats = SplitStats(
        rows=len(keep),
        dropped=dropped,
        truncated=sum(1 for i in keep if truncated[i]),
        tokens=pc.sum(pc.list_value_length(tokenized.data.column("input_ids"))).as_py() or 0,
        trained_tokens=sum(trained[i] for i in keep),
        too_long=too_long,
        cut_texts=cut_texts,
        text_pieces=cut_texts + sum(1 for p in pieces if p > 0),  # their first pieces, and the rest
        turn_rows=sum(1 for i in keep if pieces[i] < 0),
    )
    return tokenized.select_columns(list(COLUMNS)), stats


def _map(
    table: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    how: tuple[int | None, TrainOn, Thinking],
    num_proc: int | None,
    records: Sequence[_Record],
    files: str,
) -> Dataset:
    """tokenize_dataset, with a template error turned into a DataError naming the row's file and line/row."""
    from datasets import utils as progress

    max_length, train_on, thinking = how
    cache = _cache_file(table, tokenizer, how)
    quiet = len(table) < PARALLEL_FROM_ROWS and not progress.are_progress_bars_disabled()
    if quiet:  # a progress bar for a split that takes a moment is noise in the train log and the preview
        progress.disable_progress_bars()
    try:
        return tokenize_dataset(
            table,
            tokenizer,
            max_length,
            train_on=train_on,
            num_proc=num_proc,
            cache_file_name=cache,
            thinking=thinking,
        )
    except TemplateError as e:
        if e.index is None:
            raise DataError(str(e), file=files) from e
        raise records[e.index].origin.error(str(e)) from e
    finally:
        if quiet:
            progress.enable_progress_bars()


def _cache_file(
    table: Dataset, tokenizer: PreTrainedTokenizerBase, how: tuple[int | None, TrainOn, Thinking]
) -> str | None:
    """Where `datasets` caches this split's tokenization: keyed by the examples (the table's content fingerprint),
    the tokenizer with its chat template, max_length, train_on, data.thinking and the masking code; None = not
    cached."""
    import datasets
    from datasets.fingerprint import Hasher

    if len(table) < CACHE_FROM_ROWS or not datasets.is_caching_enabled():
        return None
    code = Path(masking.__file__).read_bytes()
    key = Hasher.hash([table._fingerprint, tokenizer, getattr(tokenizer, "chat_template", None), how, code])
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "lora_tune"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"tokenized-{key}.arrow")


def _num_proc(data: DataConfig, rows: int) -> int | None:
    if data.num_proc is not None:
        return data.num_proc if data.num_proc > 1 else None
    cores = min(os.cpu_count() or 1, 8)
    return cores if rows >= PARALLEL_FROM_ROWS and cores > 1 else None


def _short(error: DataError) -> str:
    """A bad row's error without the file name, for the compact report: 'line 4: not valid JSON ...'."""
    text = str(error)
    return text[len(error.file) + 2 :] if text.startswith(error.file + ": ") else text


def _files(configs: Sequence[DatasetConfig]) -> str:
    return ", ".join(dict.fromkeys(cfg.path for cfg in configs)) or "<data>"
