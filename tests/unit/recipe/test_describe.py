"""A recipe in one line, as `validate` confirms it and `train` announces it."""

from __future__ import annotations

from lora_tune.recipe.describe import describe
from lora_tune.recipe.schema import Recipe

BASE = {"model": {"name": "org/m"}, "datasets": [{"path": "d.jsonl"}], "output_dir": "runs/x"}


def test_qlora_is_named_as_such_with_its_rank_model_data_and_output():
    recipe = Recipe.model_validate({**BASE, "quantization": {"bits": 4}, "adapter": {"r": 8}})
    assert describe(recipe) == "QLoRA (4-bit nf4) r=8 on org/m; data: d.jsonl; output: runs/x"


def test_an_8_bit_base_and_the_lora_variants_are_said():
    recipe = Recipe.model_validate(
        {**BASE, "quantization": {"bits": 8}, "adapter": {"use_dora": True, "use_rslora": True}}
    )
    assert describe(recipe).startswith("lora on an 8-bit base + DoRA + rsLoRA r=16 on org/m;")
