"""Speed levers on a CUDA GPU: Liger's kernels keep the loss, auto picks the GPU defaults. Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import QLORA_RECIPE as RECIPE


def _train(tiny_model_dir: Path, tmp_path: Path, data: Path, name: str, *overrides: str) -> dict:
    recipe = tmp_path / f"{name}.yaml"
    text = RECIPE.format(model=tiny_model_dir, data=data, out=tmp_path / name)
    recipe.write_text(text.replace("dtype: float32", "dtype: bfloat16"))
    args = ["train", str(recipe), "training.max_steps=8", "training.logging_steps=1", "adapter.dropout=0", *overrides]
    assert main(args) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.mark.gpu
def test_liger_kernels_give_the_same_loss(tiny_model_dir: Path, tmp_path: Path, alpaca_file: Path):
    pytest.importorskip("liger_kernel")
    plain = _train(tiny_model_dir, tmp_path, alpaca_file, "plain")
    liger = _train(tiny_model_dir, tmp_path, alpaca_file, "liger", "training.liger=true")
    assert liger["train_loss"] == pytest.approx(plain["train_loss"], rel=2e-2)


@pytest.mark.gpu
def test_auto_levers_on_a_gpu(tmp_path: Path):
    import torch

    from lora_tune.model.attention import resolve_attention
    from lora_tune.recipe.schema import Recipe
    from lora_tune.training.trl_args import to_sft_config

    recipe = Recipe.model_validate(
        {"model": {"name": "m"}, "quantization": {"bits": 4}, "datasets": [{"path": "d"}], "output_dir": "o"}
    )
    config = to_sft_config(recipe, tmp_path, torch.bfloat16)
    assert config.optim == "paged_adamw_8bit" and config.per_device_train_batch_size == 4
    assert resolve_attention("auto", torch.bfloat16).value in {"sdpa", "flash_attention_2", "flash_attention_3"}
