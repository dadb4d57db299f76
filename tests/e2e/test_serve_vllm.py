"""`lora-tune serve RUN --engine vllm` on a GPU: the printed command serves the run's adapter on its base through
vLLM's LoRA support, and its greedy answer is `lora-tune generate`'s. Skipped without CUDA or without vLLM."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import fruit_rows, write_jsonl

RECIPE = """\
model:
  name: {model}
  dtype: bfloat16
adapter:
  r: 8
  alpha: 16
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, o_proj]
datasets:
  - path: {data}
training:
  learning_rate: 1.0e-3
  max_steps: 4
  batch_size: 8
  max_length: 64
  warmup_steps: 0
  save_strategy: "no"
eval:
  max_new_tokens: 12
output_dir: {out}
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_serves_the_runs_adapter_with_generates_greedy_answer(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install vllm on a CUDA machine)")
    import openai

    from lora_tune.inference.chat import reply
    from lora_tune.inference.load import load_for_inference

    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(40, "messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, data=data, out=tmp_path / "run"))
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    assert main(["serve", str(tmp_path / "run"), "--engine", "vllm", "--port", "8765"]) == 0
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    server = subprocess.Popen([*command, "--gpu-memory-utilization", "0.3", "--enforce-eager"])
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen("http://127.0.0.1:8765/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "vLLM did not start"
                time.sleep(2)
        question = [{"role": "user", "content": "fruit number 3?"}]
        client = openai.OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="unused")
        answer = client.chat.completions.create(model="run", messages=question, temperature=0, max_tokens=12)
    finally:
        server.terminate()
        server.wait(timeout=60)
    expected = reply(load_for_inference(tmp_path / "run"), question)
    assert answer.choices[0].message.content.strip() == expected
