"""LLaMA-Factory's public demo data sets through lora-tune's data path: no row of them is refused by the per-row
memory bound at any max_length, and its continued-pretraining corpus (c4_demo) is cut into max_length pieces that
keep every token.

The files come from LLaMA-Factory 0.9.5's source distribution (`python scripts/real_material.py`, which `make test`
runs, caches them hash-checked in .cache/real-material/llamafactory/). Without them these tests skip, naming that
command, except under CI=true, where they fail. Before the bound became an absolute size, alpaca_en_demo failed at
its quickstart's max_length 128 (row 13: 2,536 characters, over 16 x 128), glaive_toolcall_en_demo at 512 (row 52:
9,726) and c4_demo at 512 and 2,048 (a 37,499-character document).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lora_tune.data import build_datasets
from lora_tune.data.sources import MAX_ROW_CHARS, text_chars
from lora_tune.model.load import load_tokenizer
from lora_tune.recipe.schema import DatasetConfig, Recipe
from lora_tune.tasks.preference.data import one_class, read_preference_rows
from tests.helpers import ROOT

DEMO = ROOT / ".cache" / "real-material" / "llamafactory"
MAX_LENGTHS = (128, 512, 2048)
# file -> (rows, the most characters of text in one row, counted as the bound counts them)
SFT_SETS = {
    "alpaca_en_demo.json": (999, 2_921),
    "alpaca_zh_demo.json": (1_000, 1_229),
    "identity.json": (91, 132),
    "glaive_toolcall_en_demo.json": (300, 12_413),
    "glaive_toolcall_zh_demo.json": (300, 4_437),
    "mllm_demo.json": (6, 395),
}
C4 = ("c4_demo.jsonl", 300, 37_499)  # plain text: continued pretraining
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # sharegpt speakers in the preference demos


def demo_file(name: str) -> Path:
    """A cached demo set; a skip naming the command that fetches it, or under CI=true a failure."""
    path = DEMO / name
    if not path.is_file():
        reason = f"LLaMA-Factory's {name} not in {DEMO}; run: python scripts/real_material.py"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def rows_of(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def chatml_recipe(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A recipe for one demo set at one max_length, and the tokenizer training would use (chatml: tool calls)."""
    out = tmp_path_factory.mktemp("demo-run")

    def make(path: Path, max_length: int | None) -> Recipe:
        return Recipe(
            model={"name": str(tiny_model_dir), "chat_template": "chatml"},
            datasets=[{"path": str(path)}],
            training={"max_length": max_length},
            data={"dedupe": "none"},  # every row of the file reaches the tokenizer
            output_dir=str(out),
        )

    return make, load_tokenizer(make(DEMO, None).model)


@pytest.mark.parametrize("name", SFT_SETS)
def test_every_row_of_a_demo_set_is_read_at_every_max_length(name: str, chatml_recipe) -> None:
    make, tokenizer = chatml_recipe
    path = demo_file(name)
    rows, longest = SFT_SETS[name]
    assert len(rows_of(path)) == rows and max(map(text_chars, rows_of(path))) == longest
    for max_length in MAX_LENGTHS:
        prepared = build_datasets(make(path, max_length), tokenizer)  # a refused row raises, naming it
        [source] = prepared.stats.sources
        assert (source.rows, source.bad_rows) == (rows, 0), max_length
        assert prepared.stats.drops.bad_rows == 0


def test_the_c4_documents_are_cut_into_max_length_pieces_that_keep_every_token(chatml_recipe) -> None:
    """Continued pretraining: each split trains the same tokens whatever max_length is, in more or fewer rows."""
    make, tokenizer = chatml_recipe
    name, rows, longest = C4
    path = demo_file(name)
    assert max(map(text_chars, rows_of(path))) == longest  # the longest row of all the demo sets
    assert longest * 100 < MAX_ROW_CHARS  # the bound is for rows that endanger memory, far above real rows
    whole = build_datasets(make(path, None), tokenizer).stats.train
    assert (whole.rows, whole.cut_texts) == (rows, 0)
    for max_length in MAX_LENGTHS:
        prepared = build_datasets(make(path, max_length), tokenizer)  # a refused row raises, naming it
        assert prepared.stats.sources[0].rows == rows and prepared.stats.drops.bad_rows == 0
        stats, lengths = prepared.stats.train, [len(ids) for ids in prepared.datasets["train"]["input_ids"]]
        assert stats.tokens == whole.tokens and stats.truncated == 0 and max(lengths) <= max_length
        assert stats.rows == rows - stats.cut_texts + stats.text_pieces > rows and stats.cut_texts > 0, max_length
        assert f"{stats.cut_texts:,} texts over max_length cut into {stats.text_pieces:,} pieces" in stats.describe()


def sharegpt_turns(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": ROLES[t["from"]], "content": t["value"]} for t in turns]


@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json", "kto_en_demo.json"])
def test_every_row_of_a_preference_demo_set_is_read(name: str, tmp_path: Path) -> None:
    """The preference demos, in lora-tune's columns (LLaMA-Factory's own sharegpt layout is not one of them): the
    same rows and texts, so the same sizes against the bound."""
    rows = rows_of(demo_file(name))
    if name.startswith("dpo"):
        converted = [
            {"prompt": sharegpt_turns(r["conversations"]), "chosen": r["chosen"]["value"],
             "rejected": r["rejected"]["value"]} for r in rows
        ]  # fmt: skip
    else:
        converted = [{"prompt": r["messages"][:-1], "completion": r["messages"], "label": r["label"]} for r in rows]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in converted), encoding="utf-8")
    read = read_preference_rows(DatasetConfig(path=str(path)), kto=name.startswith("kto"))
    assert len(read) == len(rows) == 300
    if name.startswith("kto"):
        assert one_class(read) is None  # 150 desirable, 150 undesirable
