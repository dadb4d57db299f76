"""The same QLoRA path on a CUDA GPU (bf16 compute, device placement). Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import QLORA_RECIPE as RECIPE


@pytest.mark.gpu
def test_qlora_trains_on_gpu_in_bf16(tiny_model_dir: Path, tmp_path: Path, alpaca_file: Path):
    recipe = tmp_path / "gpu.yaml"
    text = RECIPE.format(model=tiny_model_dir, data=alpaca_file, out=tmp_path / "run")
    recipe.write_text(text.replace("dtype: float32", "dtype: bfloat16"))
    assert main(["train", str(recipe), "training.max_steps=10"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quantized_layers"] == 14 and summary["memory"]["gpu_peak_gib"] > 0
