"""Read a dataset's raw rows: local .jsonl/.json/.csv/.parquet files, `save_to_disk` folders, or hub datasets.

Rows come back as plain dicts, each with its `Origin` (file and line or row number); `formats` turns them into
conversations. Errors name the file and the line (JSON Lines, CSV) or row (JSON arrays, Parquet, Arrow folders).
With `skip_bad`, unreadable rows are collected instead of raised, so the pipeline can drop and count them.

A row so large that tokenizing it endangers memory is a bad row too (`RowLimit`), refused here before anything
parses or tokenizes it: a JSON line longer than `RowLimit.raw` bytes is skipped unparsed, read in chunks and never
held whole, and a row of another source whose values add up to more than `RowLimit.raw` characters is refused as it
is produced. `pipeline.load_source` (SFT rows) and `preference.preference_rows_with_origins` (pairs) then hold the
text the row trains on to the tighter `RowLimit.chars`. The bound does not depend on training.max_length: a row
merely longer than max_length is truncated, dropped or, as plain text, cut into pieces, all with their counts.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# The most characters of text one row may have, whatever training.max_length is: a bound on what tokenizing one row
# costs, not on what training keeps of it (max_length truncates a conversation, or cuts a text into pieces).
# Tokenizing is linear in the row: 4,000,000 characters took 10-11 s and 0.6 GB with Llama 3's and Qwen2.5's
# tokenizers on English text, 23-28 s and 1.3-1.6 GB on Chinese (2 busy cores), where a 15.6 MB answer took 53 s and
# 3.3 GB. So 4 million characters (about a million tokens of English) keep one row within a couple of gigabytes and
# half a minute, yet let through any context window and a whole book as one continued-pretraining document (War and
# Peace: 3.2 million); the longest row of LLaMA-Factory's demo sets has 37,499 (tests/e2e/test_demo_datasets.py).
MAX_ROW_CHARS = 4_000_000
# The reader's coarse bound, before a row is parsed or converted: JSON writes a character in at most 12 bytes (an
# emoji as \ud83d\ude00), and the rest of the factor is room for keys, punctuation and columns the format ignores.
RAW_PER_CHAR = 16
_CHUNK = 1 << 20  # bytes read at a time from a JSON line that is over the bound
# Suffixes that mark a path as a file the user meant to read locally, even when it is missing or unsupported.
# Hub ids may contain dots ("teknium/OpenHermes-2.5"), so any other suffix is not evidence of a local path.
_FILE_SUFFIXES = (*LOCAL_SUFFIXES, ".tsv", ".arrow", ".txt")


@dataclass(frozen=True)
class Origin:
    """Where a row came from: a file and a 1-based line (JSON Lines, CSV) or row (the other sources) number."""

    file: str
    number: int
    unit: Literal["line", "row"] = "row"

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, field=field, **{self.unit: self.number})


@dataclass(frozen=True)
class RowLimit:
    """The most characters of text a row may have (`chars`: MAX_ROW_CHARS, lower only in tests); `skippable`: whether
    data.on_bad_rows: skip can drop such a row (not in preference data, which reads every row)."""

    chars: int = MAX_ROW_CHARS
    skippable: bool = True

    @property
    def raw(self) -> int:
        """The reader's bound: bytes of a JSON line, or characters of all of a row's values, whatever the format."""
        return RAW_PER_CHAR * self.chars

    def refusal(self, size: str, *, unread: str | None = None) -> str:
        """Why a row of `size` is refused and what to do, for a DataError; `unread`: what the reader skips unread."""
        far, tail = ("far ", f"; {unread} are not read") if unread else ("", "")
        skip = ", or drop such rows with data.on_bad_rows: skip" if self.skippable else ""
        fix = f"shorten or split the row{skip}"
        return (
            f"{size}, {far}over the {self.chars:,} characters of text a row may have (a bound on the memory "
            f"tokenizing one row takes{tail}); {fix}"
        )


DEFAULT_ROW_LIMIT = RowLimit()


@dataclass
class SourceRows:
    """The rows read from one source, and (with skip_bad) the errors of the rows that could not be read."""

    rows: list[tuple[Origin, dict[str, Any]]] = field(default_factory=list)
    bad: list[tuple[Origin, DataError]] = field(default_factory=list)


def load_rows(cfg: DatasetConfig, *, row_limit: RowLimit = DEFAULT_ROW_LIMIT) -> list[dict[str, Any]]:
    """The first `cfg.limit` rows (all when None) of the dataset at `cfg.path`, each a dict of columns."""
    return [row for _, row in read_source(cfg, row_limit=row_limit).rows]


def read_source(cfg: DatasetConfig, *, skip_bad: bool = False, row_limit: RowLimit = DEFAULT_ROW_LIMIT) -> SourceRows:
    """Rows of `cfg.path` with their origins, up to `cfg.limit` good rows; bad rows raise unless `skip_bad`.

    A row over `row_limit.raw` (bytes of a JSON line, else characters of its values) is a bad row.
    """
    result = SourceRows()
    for origin, row in _rows(cfg, row_limit):
        if cfg.limit is not None and len(result.rows) >= cfg.limit:
            break
        if not isinstance(row, DataError) and origin.unit == "row":  # JSON Lines and CSV are measured as read
            size = text_chars(row)
            if size > row_limit.raw:
                unread = f"rows over {row_limit.raw:,}"
                row = origin.error(row_limit.refusal(f"has {size:,} characters in its values", unread=unread))
        if isinstance(row, DataError):
            if not skip_bad:
                raise row
            result.bad.append((origin, row))
            continue
        result.rows.append((origin, row))
    return result


def text_chars(value: Any) -> int:
    """Characters of text in `value`: its strings, inside dicts (values, not keys) and lists at any depth."""
    total, pending = 0, [value]
    while pending:  # a loop, not recursion: rows nest as deep as the JSON parser allows
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return total


def _rows(cfg: DatasetConfig, limit: RowLimit) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    path = Path(cfg.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".csv"):  # these two measure each row as they read it
            return (_read_jsonl if suffix == ".jsonl" else _read_csv)(path, cfg.path, limit)
        reader = {".json": _read_json, ".parquet": _read_parquet}.get(suffix)
        if reader is None:
            raise DataError(f"unsupported file type '{path.suffix}'; use {', '.join(LOCAL_SUFFIXES)}", file=cfg.path)
        return reader(path, cfg.path)
    if path.is_dir() and any((path / marker).is_file() for marker in ("dataset_info.json", "dataset_dict.json")):
        return _read_saved(path, cfg)
    if not path.exists() and _looks_local(cfg.path):
        raise DataError("file not found", file=cfg.path)
    return _numbered(cfg.path, _load_hub(cfg))  # a hub id, or a local folder of data files: load_dataset reads both


def _looks_local(path: str) -> bool:
    """Whether a missing `path` was meant as a local file rather than a hub id ("name" or "org/name")."""
    return (
        path.lower().endswith(_FILE_SUFFIXES)
        or path.startswith((".", "/", "~"))
        or "\\" in path
        or path.count("/") > 1
    )


def _read_jsonl(path: Path, name: str, limit: RowLimit) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    with path.open("rb") as f:
        for line_number, line in enumerate(_lines(f, limit.raw), start=1):
            origin = Origin(name, line_number, "line")
            if isinstance(line, int):  # its length: the line was over the bound, and was not kept
                message = limit.refusal(
                    f"line {line_number} is {line:,} bytes long", unread=f"lines over {limit.raw:,} bytes"
                )
                yield origin, DataError(message, file=name)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError; nested too deep
                yield origin, DataError(f"line {line_number} is not valid JSON: {_reason(e)}", file=name)
                continue
            if not isinstance(row, dict):
                message = f"line {line_number} is a JSON {_kind(row)}; each line must be one JSON object"
                yield origin, DataError(message, file=name)
                continue
            yield origin, row


def _lines(f: BinaryIO, limit: int) -> Iterator[bytes | int]:
    """Each line of `f`; one over `limit` bytes (newline not counted) comes back as its length, read in chunks and
    never held whole."""
    while line := f.readline(limit + 1):
        if len(line) - line.endswith(b"\n") <= limit:
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := f.readline(_CHUNK)):
            size += len(line)
        yield size - line.endswith(b"\n")


def _read_json(path: Path, name: str) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise DataError(f"not valid JSON: {_reason(e)}", file=name) from e
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)}" if isinstance(data, dict) else ""
        raise DataError(
            f"expected a top-level JSON array of row objects, got a JSON {_kind(data)}{keys} "
            "(one object per line is JSON Lines: name the file .jsonl)",
            file=name,
        )
    for row_number, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield Origin(name, row_number), row
        else:
            error = DataError(f"is a JSON {_kind(row)}; each array item must be an object", file=name, row=row_number)
            yield Origin(name, row_number), error


def _read_csv(path: Path, name: str, limit: RowLimit) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    """CSV with a header row; every value is text, and an empty cell is read as missing (None)."""
    csv.field_size_limit(2**31 - 1)  # the default (131,072 characters) refuses long documents
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a byte-order mark
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"cannot read the CSV header: {e}", file=name, line=1) from e
        while True:
            line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as e:
                yield Origin(name, line, "line"), DataError(f"not valid CSV: {e}", file=name, line=line)
                continue
            if not any(v.strip() for v in values):
                continue
            size = sum(len(v) for v in values)
            if size > limit.raw:
                message = limit.refusal(f"has {size:,} characters in its values", unread=f"rows over {limit.raw:,}")
                yield Origin(name, line, "line"), DataError(message, file=name, line=line)
                continue
            if len(values) != len(header):
                message = f"has {len(values)} values, the header has {len(header)} columns ({', '.join(header)})"
                yield Origin(name, line, "line"), DataError(message, file=name, line=line)
                continue
            row = {k: (v if v != "" else None) for k, v in zip(header, values, strict=True)}
            yield Origin(name, line, "line"), row


def _read_parquet(path: Path, name: str) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError...: all mean "not a readable Parquet file"
        raise DataError(f"cannot read Parquet: {e}", file=name) from e
    return _numbered(name, table.to_pylist())


def _read_saved(path: Path, cfg: DatasetConfig) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    """A folder written by `Dataset.save_to_disk` (one split) or `DatasetDict.save_to_disk` (pick `cfg.split`)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise DataError(
                f"has no split '{cfg.split}'; it has {', '.join(loaded)} (set split: in the recipe)",
                file=cfg.path,
                field="split",
            )
        loaded = loaded[cfg.split]
    if cfg.limit is not None and cfg.limit < len(loaded):
        loaded = loaded.select(range(cfg.limit))
    return _numbered(cfg.path, loaded.to_list())


def _numbered(name: str, rows: list[dict[str, Any]]) -> Iterator[tuple[Origin, dict[str, Any] | DataError]]:
    for number, row in enumerate(rows, start=1):
        yield Origin(name, number), row


def _load_hub(cfg: DatasetConfig) -> list[dict[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(cfg.path, split=cfg.split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:  # not found, offline, bad split
        raise DataError(f"cannot load dataset (split '{cfg.split}'): {e}", file=cfg.path) from e
    if cfg.limit is not None and cfg.limit < len(dataset):
        dataset = dataset.select(range(cfg.limit))
    return dataset.to_list()


def _reason(e: ValueError) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} (line {e.lineno}, column {e.colno})" if e.lineno > 1 else f"{e.msg} (column {e.colno})"
    return str(e)


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
