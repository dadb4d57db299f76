"""Merge a run made by real 4-bit QLoRA training through the CLI: plain merge and merge into the NF4 base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import QLORA_RECIPE as RECIPE


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import fruit_rows, write_jsonl

    root = tmp_path_factory.mktemp("qlora-export")
    data = write_jsonl(root / "train.jsonl", fruit_rows(24, "alpaca"))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, data=data, out=root / "run"))
    overrides = [
        "training.max_steps=3",
        "training.eval_strategy=no",
        "training.eval_steps=null",
        "training.save_strategy=no",
    ]
    assert main(["train", str(recipe), *overrides]) == 0
    return root / "run"


def test_qlora_run_merges_and_matches_base_plus_adapter(qlora_run: Path, tmp_path: Path):
    from lora_tune.export import merge

    result = merge(qlora_run, tmp_path / "merged", dtype="fp32")
    assert result.lora_modules == 14 and result.max_abs_diff < 1e-4
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "qlora" in card and "Training results" in card and "steps | 3" in card


def test_merge_from_dequantized_reproduces_the_trained_function(qlora_run: Path, tmp_path: Path):
    from lora_tune.export import merge

    result = merge(qlora_run, tmp_path / "merged", dtype="fp32", from_dequantized=True)
    # Against the 4-bit base + adapter as trained: float32 rounding only. Against the unquantized base's merge:
    # the NF4 quantization error, which is far larger.
    assert result.max_abs_diff < 1e-4
    assert result.dequantized_vs_plain > 100 * result.max_abs_diff
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert "NF4-dequantized base" in (tmp_path / "merged" / "README.md").read_text()
