"""Two processes on the CPU (gloo, DDP) through the real launchers, against one process with the same effective batch.

`lora-tune train RECIPE --nproc 2` runs torchrun; the failure test goes through `accelerate launch --config_file
recipes/accelerate/ddp.yaml`. The base is QLoRA's 4-bit NF4 (bitsandbytes' CPU backend works under DDP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_tune.cli import main

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 8
  alpha: 16
  dropout: 0.0
datasets:
  - path: {data}
data:
  dedupe: none  # the fruit rows repeat; 64 rows keep the 8 steps inside one epoch on both sides
training:
  learning_rate: 2.0e-2
  max_steps: {steps}
  batch_size: 2
  max_length: 64
  packing: false  # 64 short rows packed would end the epoch mid-run, where DDP evens out the last batch
  warmup_steps: 2
  logging_steps: 1
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


def launch(args: list[str], env_extra: dict[str, str] | None = None, timeout: int = 240) -> tuple[int, str, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(env_extra or {}),
    }
    started = time.monotonic()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from tests.conftest import fruit_rows, write_jsonl

    root = tmp_path_factory.mktemp("distributed")
    data = write_jsonl(root / "train.jsonl", fruit_rows(64, "alpaca"))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, data=data, steps=STEPS, out=root / "two"))
    command = [sys.executable, "-m", "lora_tune", "train", str(recipe), "--nproc", "2"]
    code, output, _ = launch(command, {"LORA_TUNE_LOG_ALL_RANKS": "1"})
    assert code == 0, output[-4000:]
    # One process, the same 4 examples per optimizer step: batch_size 2 x 2 accumulation steps.
    single = ["train", str(recipe), "training.gradient_accumulation_steps=2", f"output_dir={root / 'one'}"]
    assert main(single) == 0
    return {"two": root / "two", "one": root / "one", "output": output, "recipe": recipe}


def losses_and_lrs(run: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    return [r["loss"] for r in steps], [r["learning_rate"] for r in steps]


def test_one_adapter_written_by_the_main_process(runs: dict):
    two: Path = runs["two"]
    assert [p.name for p in two.glob("**/adapter_model.safetensors")] == ["adapter_model.safetensors"]
    assert (two / "adapter" / "adapter_config.json").is_file() and (two / "adapter" / "tokenizer.json").is_file()
    assert not (two / ".adapter.tmp").exists() and not (two / ".prepared-data").exists()
    output: str = runs["output"]
    assert output.count("Adapter saved to") == 1  # the console summary, from the main process only
    assert "[rank 0/2] batch: 2 per device x 2 processes x 1 accumulation = 4 examples per optimizer step" in output


def test_effective_batch_recorded(runs: dict):
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["effective_batch_size"] == 4 and summary["strategy"] == "ddp"
    assert summary["steps"] == STEPS
    one = json.loads((runs["one"] / "summary.json").read_text())
    assert one["processes"] == 1 and one["effective_batch_size"] == 4
    resolved = (runs["two"] / "recipe.yaml").read_text()
    assert "# run as 2 processes (ddp); batch: 2 per device x 2 processes x 1 accumulation = 4 examples" in resolved
    assert "= 4 examples per optimizer step" in (runs["one"] / "recipe.yaml").read_text()


def test_weights_identical_on_both_ranks_and_equal_to_the_saved_adapter(runs: dict):
    from safetensors.torch import load_file

    from lora_tune.training.processes import state_checksum

    checksums = json.loads((runs["two"] / "summary.json").read_text())["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    saved = load_file(runs["two"] / "adapter" / "adapter_model.safetensors")
    assert state_checksum(saved) == checksums[0]


def test_data_prepared_once_by_rank_zero(runs: dict):
    output: str = runs["output"]
    assert output.count("data: tokenized on rank") == 1 and "[rank 0/2] data: tokenized on rank 0" in output
    assert "[rank 1/2] data: rank 1 loaded the main process's tokenized data" in output
    assert output.count("pre-flight:") == 1


def test_loss_falls_and_matches_one_process_with_the_same_effective_batch(runs: dict):
    import torch
    from safetensors.torch import load_file

    loss_two, lr_two = losses_and_lrs(runs["two"])
    loss_one, lr_one = losses_and_lrs(runs["one"])
    assert len(loss_two) == len(loss_one) == STEPS
    assert loss_two[-1] < loss_two[0] - 0.3, loss_two
    assert lr_two == pytest.approx(lr_one, rel=1e-9)  # the same schedule, step for step
    # Same examples per step (accelerate shards each global batch across ranks); gradients average over the
    # tokens of all ranks (average_tokens_across_devices), as accumulation does over micro-batches.
    assert loss_two == pytest.approx(loss_one, abs=2e-3), (loss_two, loss_one)
    two = load_file(runs["two"] / "adapter" / "adapter_model.safetensors")
    one = load_file(runs["one"] / "adapter" / "adapter_model.safetensors")
    assert two.keys() == one.keys()
    worst = max((two[k] - one[k]).abs().max().item() for k in two)
    scale = max(one[k].abs().max().item() for k in one)
    assert worst < 0.02 * scale, (worst, scale)
    assert any(not torch.equal(two[k], torch.zeros_like(two[k])) for k in two if "lora_B" in k)


def test_failure_on_one_rank_stops_the_job_with_the_real_error(tiny_model_dir: Path, tmp_path: Path):
    from tests.conftest import fruit_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(16, "alpaca"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, data=data, steps=2, out=tmp_path / "run"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml"]
    command += ["--num_processes", "2", "-m", "lora_tune", "train", str(recipe)]
    code, output, seconds = launch(command, {"LORA_TUNE_FAIL_ON_RANK": "1"}, timeout=180)
    assert code != 0, output[-3000:]
    assert "[rank 1/2] error: RuntimeError: injected failure on rank 1" in output, output[-3000:]
    assert not (tmp_path / "run" / "adapter").exists()
    assert seconds < 120, f"the job took {seconds:.0f}s to stop"  # generous on a loaded 2-core CI box; no hang


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed-zero3"])
def test_sharded_qlora_on_two_gpus(strategy: str, tiny_model_dir: Path, tmp_path: Path):
    """FSDP-QLoRA and ZeRO-3 QLoRA need CUDA GPUs (accelerate runs CPU processes as DDP): run where there are two."""
    import importlib.util

    if not _two_gpus():
        pytest.skip("needs 2 CUDA GPUs")
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs the deepspeed package")
    from tests.conftest import fruit_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(64, "alpaca"))
    recipe = tmp_path / "recipe.yaml"
    text = RECIPE.format(model=tiny_model_dir, data=data, steps=STEPS, out=tmp_path / "run")
    recipe.write_text(text.replace("dtype: float32", "dtype: bfloat16") + f"distributed: {{strategy: {strategy}}}\n")
    code, output, _ = launch([sys.executable, "-m", "lora_tune", "train", str(recipe), "--nproc", "2"], timeout=600)
    assert code == 0, output[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["processes"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    losses, _ = losses_and_lrs(tmp_path / "run")
    assert losses[-1] < losses[0], losses
