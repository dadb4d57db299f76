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


@pytest.mark.gpu
@pytest.mark.slow
def test_grpo_generates_with_vllm_colocated(tiny_model_dir: Path, tmp_path: Path):
    """rl.use_vllm (colocate): the completions come from vLLM in the training process; the run ends as any other."""
    pytest.importorskip("vllm", reason="pip install vllm (docs/rl.md)")
    rows = [{"prompt": f"fruit number {i % 9}?", "answer": "apple"} for i in range(16)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_model_dir}, dtype: bfloat16}}\ndatasets: [{{path: {data}}}]\n"
        "training: {objective: grpo, max_steps: 2, batch_size: 4, max_length: 64, save_strategy: 'no'}\n"
        "rl: {num_generations: 4, max_completion_length: 8, use_vllm: true, vllm_mode: colocate}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_reward"] is not None
