"""Row length limits: a row far longer than training.max_length can use is a bad row, refused by the reader (file and
line, one short error line) before anything tokenizes it, with memory bounded by the limit rather than the row."""

from __future__ import annotations

import csv
import json
import tracemalloc
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.data.pipeline import load_source
from lora_tune.data.sources import MAX_ROW_CHARS, RowLimit, read_source
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig
from tests.conftest import fruit_rows, write_jsonl

RECIPE = """\
model:
  name: {model}
  chat_template: chatml
datasets:
  - path: {data}
training:
  max_length: 64
  packing: false
output_dir: {out}
"""
ROLES = len("user") + len("assistant")  # role names are text the template renders, and count


def chat(user: str, answer: str = "apple") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_recipe(tmp_path: Path, model: Path, rows: list[dict], extra: str = "") -> tuple[Path, Path]:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, out=tmp_path / "run") + extra)
    return recipe, data


def test_a_2mb_row_is_refused_by_the_cli_with_file_and_line_in_bounded_time(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    rows = fruit_rows(12, "messages")
    rows.insert(2, chat("q" * 2_000_000))  # line 3
    recipe, data = write_recipe(tmp_path, tiny_model_dir, rows)
    assert main(["data", str(recipe)]) == 2  # tokenizing the row whole took ~5 s here, and 12.8 GB at 50 MB
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 400 and "qqqq" not in err  # one short line, no echo
    assert f"{data}: line 3 is 2,000," in err and "bytes long" in err
    assert "1,024 characters of text a row may have (16 x training.max_length 64" in err
    assert "data.on_bad_rows: skip" in err


def test_with_on_bad_rows_skip_the_long_row_is_dropped_and_counted(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    rows = fruit_rows(12, "messages")
    rows.insert(2, chat("q" * 2_000_000))
    recipe, _ = write_recipe(tmp_path, tiny_model_dir, rows, "data:\n  on_bad_rows: skip\n")
    assert main(["data", str(recipe), "--n", "0"]) == 0
    out = capsys.readouterr().out
    assert "(train; 1 bad rows skipped)" in out and "dropped before tokenizing: 1 bad rows (line 3 is" in out


def test_the_limit_scales_with_max_length(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = fruit_rows(12, "messages")
    rows.insert(4, chat("q" * 1_500))  # 16 x 64 = 1,024 characters allowed; 16 x 128 = 2,048
    recipe, data = write_recipe(tmp_path, tiny_model_dir, rows)
    assert main(["data", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 5: has {1_500 + 5 + ROLES:,} characters of text, over the 1,024" in err
    assert main(["data", str(recipe), "training.max_length=128", "--n", "0"]) == 0
    assert RowLimit.for_max_length(128).chars == 2 * RowLimit.for_max_length(64).chars == 2_048


def test_a_row_at_the_limit_is_read_and_one_character_more_is_refused(tmp_path: Path) -> None:
    limit = RowLimit.for_max_length(64)
    at_limit = chat("q" * (1_024 - ROLES - 5))
    path = write_jsonl(tmp_path / "data.jsonl", [at_limit, chat("q" * (1_024 - ROLES - 4))])
    cfg = DatasetConfig(path=str(path))
    examples, bad = load_source(cfg, skip_bad=True, row_limit=limit)
    assert [origin.number for origin, _ in examples] == [1]
    assert [str(e) for e in bad] == [
        f"{path}: line 2: has 1,025 characters of text, over the 1,024 characters of text a row may have "
        "(16 x training.max_length 64); shorten or split the row, or drop such rows with data.on_bad_rows: skip"
    ]
    with pytest.raises(DataError, match=r": line 2: has 1,025 characters of text"):
        load_source(cfg, row_limit=limit)


def test_without_max_length_the_cap_is_a_million_characters(tmp_path: Path) -> None:
    limit = RowLimit.for_max_length(None)
    assert limit.chars == MAX_ROW_CHARS == 1_000_000
    path = write_jsonl(tmp_path / "data.jsonl", [chat("q" * (MAX_ROW_CHARS - ROLES - 5)), chat("q" * MAX_ROW_CHARS)])
    examples, bad = load_source(DatasetConfig(path=str(path)), skip_bad=True, row_limit=limit)
    assert len(examples) == 1 and "line 2: has 1,000,018 characters of text" in str(bad[0])
    assert "training.max_length is null" in str(bad[0])


def test_a_long_jsonl_line_is_not_parsed_and_never_held_whole(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    with path.open("wb") as f:  # line 2 is 12 MB and not even JSON: it must be measured, not parsed
        f.write(b'{"a": 1}\n{"a": "' + b"x" * 12_000_000 + b'\n\n{"a": 3}\n')
    tracemalloc.start()
    try:
        result = read_source(DatasetConfig(path=str(path)), skip_bad=True, row_limit=RowLimit.for_max_length(64))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000  # bounded by the 16,384-byte line bound and the 1 MiB chunk, not by the row
    assert [(origin.number, row) for origin, row in result.rows] == [(1, {"a": 1}), (4, {"a": 3})]
    [(origin, error)] = result.bad
    assert origin.number == 2 and str(error).startswith(f"{path}: line 2 is 12,000,007 bytes long, far over")
    assert "lines over 16,384 bytes are not read" in str(error)


def test_columns_the_format_does_not_use_count_only_toward_the_coarse_reader_bound(tmp_path: Path) -> None:
    row = {**chat("what fruit?"), "source_document": "d" * 10_000}  # 10x the text limit, under 16x
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    examples, bad = load_source(DatasetConfig(path=str(path)), row_limit=RowLimit.for_max_length(64))
    assert len(examples) == 1 and not bad


def test_csv_json_and_parquet_rows_are_measured_as_they_are_produced(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    limit = RowLimit.for_max_length(64)
    long = "q" * 20_000  # over the 16,384-character bound of the reader
    rows = [{"prompt": "what fruit?", "completion": "apple"}, {"prompt": long, "completion": "pear"}]
    with (tmp_path / "data.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    for name, where in (("data.csv", "line 3"), ("data.json", "row 2"), ("data.parquet", "row 2")):
        result = read_source(DatasetConfig(path=str(tmp_path / name)), skip_bad=True, row_limit=limit)
        assert len(result.rows) == 1
        assert str(result.bad[0][1]).startswith(f"{tmp_path / name}: {where}: has 20,004 characters in its values")
        with pytest.raises(DataError, match="rows over 16,384 are not read"):
            read_source(DatasetConfig(path=str(tmp_path / name)), row_limit=limit)


def test_the_pre_flight_check_applies_the_recipes_limit_too(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """Under the 1,000,000-character default cap but over 16 x max_length: `check` refuses it as training would."""
    rows = fruit_rows(12, "messages")
    rows.insert(4, chat("q" * 5_000))  # line 5
    recipe, data = write_recipe(tmp_path, tiny_model_dir, rows)
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{data}: line 5" in err and "16 x training.max_length 64" in err
