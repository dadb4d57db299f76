"""Reading raw rows: JSON Lines, JSON, CSV, Parquet, save_to_disk folders, limits, bad rows, missing files, hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.data import load_rows, read_source
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_jsonl_rows_in_order_skipping_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": "é"}\n   \n', encoding="utf-8")
    assert load_rows(DatasetConfig(path=str(path))) == [{"a": 1}, {"a": "é"}]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(DatasetConfig(path=str(path)))
    assert str(info.value).startswith(f"{path}: line 3 is not valid JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2 is a JSON array; each line must be one JSON object"):
        load_rows(DatasetConfig(path=str(path)))


def test_jsonl_limit_stops_reading(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\nnot json\n', encoding="utf-8")  # the bad line is never reached
    assert load_rows(DatasetConfig(path=str(path), limit=2)) == [{"a": 1}, {"a": 2}]


def test_json_array_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"a": i} for i in range(5)]), encoding="utf-8")
    assert load_rows(DatasetConfig(path=str(path))) == [{"a": i} for i in range(5)]
    assert load_rows(DatasetConfig(path=str(path), limit=3)) == [{"a": 0}, {"a": 1}, {"a": 2}]


def test_json_object_at_top_level_is_refused_naming_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [{"a": 1}], "version": 2}), encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a top-level JSON array .* got a JSON object with keys \['data'"):
        load_rows(DatasetConfig(path=str(path)))


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.json: not valid JSON: Expecting value \(line 3, column 9\)"):
        load_rows(DatasetConfig(path=str(path)))


def test_json_array_item_that_is_not_an_object_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[{"a": 1}, "text"]', encoding="utf-8")
    with pytest.raises(DataError, match="row 2: is a JSON string"):
        load_rows(DatasetConfig(path=str(path)))


def test_json_nested_too_deeply_is_invalid_json_not_a_crash(tmp_path: Path) -> None:
    deep = "[" * 100_000  # the parser gives up with RecursionError, which is not a ValueError
    lines = tmp_path / "data.jsonl"
    lines.write_text('{"a": 1}\n' + deep + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.jsonl: line 2 is not valid JSON: maximum recursion depth"):
        load_rows(DatasetConfig(path=str(lines)))
    array = tmp_path / "data.json"
    array.write_text(deep, encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.json: not valid JSON: maximum recursion depth"):
        load_rows(DatasetConfig(path=str(array)))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "sub/dir/train", "./train"])
def test_missing_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"^{name}: file not found$"):
        load_rows(DatasetConfig(path=name))


def test_unsupported_local_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text("a\tb\n1\t2\n", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.tsv'"):
        load_rows(DatasetConfig(path=str(path)))


def test_other_names_go_to_the_hub_with_split_and_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        calls.append((path, split))
        return datasets.Dataset.from_list([{"a": i} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(DatasetConfig(path="teknium/OpenHermes-2.5", split="test", limit=2))
    assert calls == [("teknium/OpenHermes-2.5", "test")]
    assert rows == [{"a": 0}, {"a": 1}]


def test_hub_failure_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"^org/nope: cannot load dataset \(split 'train'\): Dataset 'org/nope'"):
        load_rows(DatasetConfig(path="org/nope"))


def test_csv_rows_with_empty_cells_as_missing_and_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('instruction,input,output\nAdd.,"1, 2",3\n\nSay hi.,,"hi\nthere"\n', encoding="utf-8")
    result = read_source(DatasetConfig(path=str(path)))
    assert [row for _, row in result.rows] == [
        {"instruction": "Add.", "input": "1, 2", "output": "3"},
        {"instruction": "Say hi.", "input": None, "output": "hi\nthere"},
    ]
    assert [origin.number for origin, _ in result.rows] == [2, 4]  # file lines: the header is line 1


def test_csv_with_a_byte_order_mark_and_a_long_cell(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    long = "word " * 40_000  # 200,000 characters: over the csv module's default field limit
    path.write_text(f"\ufefftext\n{long}\n", encoding="utf-8")
    assert load_rows(DatasetConfig(path=str(path))) == [{"text": long}]


def test_csv_row_with_the_wrong_number_of_values_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_rows(DatasetConfig(path=str(path)))
    assert str(info.value) == f"{path}: line 3: has 3 values, the header has 2 columns (prompt, completion)"


def test_parquet_rows_and_limit(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"doc {i}", "n": i} for i in range(4)]), path)
    assert load_rows(DatasetConfig(path=str(path), limit=2)) == [{"text": "doc 0", "n": 0}, {"text": "doc 1", "n": 1}]


def test_save_to_disk_folders_one_split_or_several(tmp_path: Path) -> None:
    import datasets

    single = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])
    single.save_to_disk(tmp_path / "single")
    assert load_rows(DatasetConfig(path=str(tmp_path / "single"))) == [{"prompt": "p", "completion": "c"}]
    several = datasets.DatasetDict({"train": single, "test": datasets.Dataset.from_list([{"prompt": "q"}] * 3)})
    several.save_to_disk(tmp_path / "dict")
    assert load_rows(DatasetConfig(path=str(tmp_path / "dict"), split="test", limit=2)) == [{"prompt": "q"}] * 2
    with pytest.raises(DataError, match=r"dict: field 'split': has no split 'valid'; it has train, test"):
        load_rows(DatasetConfig(path=str(tmp_path / "dict"), split="valid"))


def test_skip_bad_collects_unreadable_lines_and_limit_counts_good_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1]\n{"a": 2}\n{"a": 3}\n', encoding="utf-8")
    result = read_source(DatasetConfig(path=str(path), limit=2), skip_bad=True)
    assert [row for _, row in result.rows] == [{"a": 1}, {"a": 2}]
    assert len(result.bad) == 2
    assert str(result.bad[0][1]).startswith(f"{path}: line 2 is not valid JSON")
    assert str(result.bad[1][1]) == f"{path}: line 3 is a JSON array; each line must be one JSON object"
