"""Row size bound: a row whose tokenizing would endanger memory (over MAX_ROW_CHARS characters of text, whatever
training.max_length is) is a bad row, refused by the reader (file and line, one short error line) before anything
tokenizes it; a row merely longer than max_length is not refused, it is truncated, dropped or cut with its counts."""

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
OVER = MAX_ROW_CHARS + 500_000  # a row's text over the bound: 4.5 MB, parsed in well under a second
SMALL = RowLimit(1_024)  # the bound scaled down, for tests of the reader's arithmetic


def chat(user: str, answer: str = "apple") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_recipe(tmp_path: Path, model: Path, rows: list[dict], extra: str = "") -> tuple[Path, Path]:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, data=data, out=tmp_path / "run") + extra)
    return recipe, data


def test_the_bound_is_an_absolute_size_of_a_few_megabytes() -> None:
    assert RowLimit().chars == MAX_ROW_CHARS == 4_000_000  # the reasons are with MAX_ROW_CHARS in sources.py
    assert RowLimit().raw == 64_000_000  # bytes of a JSON line past which it is not even parsed


def test_a_row_over_the_bound_is_refused_by_the_cli_with_file_and_line(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    rows = fruit_rows(12, "messages")
    rows.insert(2, chat("q" * OVER))  # line 3
    recipe, data = write_recipe(tmp_path, tiny_model_dir, rows)
    assert main(["data", str(recipe)]) == 2  # tokenizing a 15.6 MB row took 53 s and 3.3 GB here
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and len(err) < 400 and "qqqq" not in err  # one short line, no echo
    assert f"{data}: line 3: has {OVER + 5 + ROLES:,} characters of text, over the 4,000,000 characters" in err
    assert "a bound on the memory tokenizing one row takes" in err and "data.on_bad_rows: skip" in err


def test_with_on_bad_rows_skip_the_row_over_the_bound_is_dropped_and_counted(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    rows = fruit_rows(12, "messages")
    rows.insert(2, chat("q" * OVER))
    recipe, _ = write_recipe(tmp_path, tiny_model_dir, rows, "data:\n  on_bad_rows: skip\n")
    assert main(["data", str(recipe), "--n", "0"]) == 0
    out = capsys.readouterr().out
    assert "(train; 1 bad rows skipped)" in out and "dropped before tokenizing: 1 bad rows (line 3: has" in out


@pytest.mark.parametrize("max_length", [128, 512, 2048])
def test_rows_longer_than_max_length_are_truncated_not_refused(
    max_length: int, tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    """The lengths of public demo rows the old bound (16 x max_length characters) refused: alpaca_en_demo row 13
    (2,536 characters) at 128, a glaive tool-call row (9,726) at 512, a c4 document (37,499) at 2,048."""
    words = "the quick brown fox jumps over the lazy dog "
    rows = [chat(f"fruit number {i}?", (words * 900)[: n - len(f"fruit number {i}?") - ROLES]) for i, n in
            enumerate([2_536, 9_726, 37_499])]  # fmt: skip
    recipe, _ = write_recipe(tmp_path, tiny_model_dir, [*fruit_rows(9, "messages"), *rows])
    assert main(["data", str(recipe), f"training.max_length={max_length}", "--n", "0"]) == 0
    out = capsys.readouterr().out
    assert "train: 12 rows" in out and "dropped before tokenizing: nothing" in out
    assert "truncated)" in out  # cut to max_length as before, and counted
    assert main(["check", str(recipe), f"training.max_length={max_length}", "model.chat_template=null"]) == 0
    assert "WARN  truncation" in capsys.readouterr().out


def test_a_row_at_the_limit_is_read_and_one_character_more_is_refused(tmp_path: Path) -> None:
    at_limit = chat("q" * (1_024 - ROLES - 5))
    path = write_jsonl(tmp_path / "data.jsonl", [at_limit, chat("q" * (1_024 - ROLES - 4))])
    cfg = DatasetConfig(path=str(path))
    examples, bad = load_source(cfg, skip_bad=True, row_limit=SMALL)
    assert [origin.number for origin, _ in examples] == [1]
    assert [str(e) for e in bad] == [
        f"{path}: line 2: has 1,025 characters of text, over the 1,024 characters of text a row may have "
        "(a bound on the memory tokenizing one row takes); shorten or split the row, or drop such rows with "
        "data.on_bad_rows: skip"
    ]
    with pytest.raises(DataError, match=r": line 2: has 1,025 characters of text"):
        load_source(cfg, row_limit=SMALL)


def test_a_long_jsonl_line_is_not_parsed_and_never_held_whole(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    with path.open("wb") as f:  # line 2 is 12 MB and not even JSON: it must be measured, not parsed
        f.write(b'{"a": 1}\n{"a": "' + b"x" * 12_000_000 + b'\n\n{"a": 3}\n')
    tracemalloc.start()
    try:
        result = read_source(DatasetConfig(path=str(path)), skip_bad=True, row_limit=SMALL)
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
    examples, bad = load_source(DatasetConfig(path=str(path)), row_limit=SMALL)
    assert len(examples) == 1 and not bad


def test_csv_json_and_parquet_rows_are_measured_as_they_are_produced(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    long = "q" * 20_000  # over the 16,384-character bound of the reader
    rows = [{"prompt": "what fruit?", "completion": "apple"}, {"prompt": long, "completion": "pear"}]
    with (tmp_path / "data.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data.parquet")
    for name, where in (("data.csv", "line 3"), ("data.json", "row 2"), ("data.parquet", "row 2")):
        result = read_source(DatasetConfig(path=str(tmp_path / name)), skip_bad=True, row_limit=SMALL)
        assert len(result.rows) == 1
        assert str(result.bad[0][1]).startswith(f"{tmp_path / name}: {where}: has 20,004 characters in its values")
        with pytest.raises(DataError, match="rows over 16,384 are not read"):
            read_source(DatasetConfig(path=str(tmp_path / name)), row_limit=SMALL)


def test_the_pre_flight_check_refuses_the_row_before_tokenizing_it(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    rows = fruit_rows(12, "messages")
    rows.insert(4, chat("q" * OVER))  # line 5
    recipe, data = write_recipe(tmp_path, tiny_model_dir, rows)
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{data}: line 5: has " in err and "over the 4,000,000" in err
