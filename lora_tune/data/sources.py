"""Read a dataset's raw rows: local JSON Lines / JSON files, or a hub dataset when the path is not local.

Rows come back as plain dicts; `formats` turns them into conversations. Errors name the file and the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tune.config import DatasetConfig
from lora_tune.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json")
# Suffixes that mark a path as a file the user meant to read locally, even when it is missing or unsupported.
# Hub ids may contain dots ("teknium/OpenHermes-2.5"), so any other suffix is not evidence of a local path.
_FILE_SUFFIXES = (*LOCAL_SUFFIXES, ".csv", ".tsv", ".parquet", ".arrow", ".txt")


def load_rows(cfg: DatasetConfig) -> list[dict[str, Any]]:
    """The first `cfg.limit` rows (all when None) of the dataset at `cfg.path`, each a dict of columns."""
    path = Path(cfg.path).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _read_jsonl(path, cfg.path, cfg.limit)
        if suffix == ".json":
            return _read_json(path, cfg.path, cfg.limit)
        raise DataError(f"unsupported file type '{path.suffix}'; use .jsonl or .json", file=cfg.path)
    if not path.exists() and _looks_local(cfg.path):
        raise DataError("file not found", file=cfg.path)
    return _load_hub(cfg)  # a hub id, or a local folder of data files: both are what `load_dataset` reads


def _looks_local(path: str) -> bool:
    """Whether a missing `path` was meant as a local file rather than a hub id ("name" or "org/name")."""
    return (
        path.lower().endswith(_FILE_SUFFIXES)
        or path.startswith((".", "/", "~"))
        or "\\" in path
        or path.count("/") > 1
    )


def _read_jsonl(path: Path, name: str, limit: int | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise DataError(f"line {line_number} is not valid JSON: {_reason(e)}", file=name) from e
            if not isinstance(row, dict):
                raise DataError(
                    f"line {line_number} is a JSON {_kind(row)}; each line must be one JSON object", file=name
                )
            rows.append(row)
    return rows


def _read_json(path: Path, name: str, limit: int | None) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as e:
        raise DataError(f"not valid JSON: {_reason(e)}", file=name) from e
    if not isinstance(data, list):
        keys = f" with keys {sorted(data)}" if isinstance(data, dict) else ""
        raise DataError(
            f"expected a top-level JSON array of row objects, got a JSON {_kind(data)}{keys} "
            "(one object per line is JSON Lines: name the file .jsonl)",
            file=name,
        )
    rows = data[:limit] if limit is not None else data
    for row_number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"is a JSON {_kind(row)}; each array item must be an object", file=name, row=row_number)
    return rows


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
