"""vLLM for users who outgrow one process: the `vllm serve` command that serves a run's adapter on its base with
vLLM's LoRA support, after checking that the adapter is one vLLM can load.

vLLM needs a CUDA GPU (it cannot run on this project's CPU test machines), so lora-tune does not start it: `lora-tune
serve RUN --engine vllm` checks the run and prints the command. The checks follow what vLLM's LoRA loader accepts:
a plain LoRA adapter (no DoRA, no trained bias, no `modules_to_save` such as a resized embedding or a new head), a
rank vLLM has a kernel for (`--max-lora-rank`: the smallest of its supported ranks that holds the adapter's), and
target modules that are linear projections of the attention and MLP blocks. A run whose adapter fails one is
refused in one line naming why; merge it (`lora-tune merge`) and serve the merged folder with `vllm serve` instead.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from lora_tune.recipe.load import load_recipe
from lora_tune.run.layout import RunDir
from lora_tune.serve.backend import ServeError

# Ranks vLLM compiles LoRA kernels for (`--max-lora-rank` must be one of them).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Linear layers vLLM's LoRA layers replace, by the module names transformers' decoder models use.
VLLM_TARGETS = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "qkv_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "gate_up_proj",
        "query_key_value",
        "dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "c_attn",
        "c_proj",
        "c_fc",
        "fc1",
        "fc2",
        "out_proj",
        "w1",
        "w2",
        "w3",
    }
)


def vllm_command(path: str | Path, *, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> str:
    """The `vllm serve` command line for the run at `path`, or a one-line ServeError saying why vLLM cannot load
    its adapter."""
    run = RunDir(Path(path))
    if not run.is_run() or not (run.adapter / "adapter_config.json").is_file():
        raise ServeError(f"{path}: --engine vllm serves a run's LoRA adapter; this is not a run with adapter/")
    config = json.loads((run.adapter / "adapter_config.json").read_text(encoding="utf-8"))
    rank = check_adapter(config)
    recipe = load_recipe(run.recipe, check_paths=False)
    name = model_name or run.root.resolve().name
    words = ["vllm", "serve", recipe.model.name]
    if recipe.model.revision:
        words += ["--revision", recipe.model.revision]
    if recipe.quantization.bits == 4:  # the base as trained: 4-bit NF4 through bitsandbytes
        words += ["--quantization", "bitsandbytes"]
    words += [
        "--enable-lora",
        "--lora-modules",
        f"{name}={run.adapter.resolve()}",
        "--max-lora-rank",
        str(rank),
        "--tokenizer",
        str(run.adapter.resolve()),  # the tokenizer (and chat template) the adapter was trained with
        "--host",
        host,
        "--port",
        str(port),
    ]
    return shlex.join(words)


def check_adapter(config: dict) -> int:
    """The `--max-lora-rank` for an adapter_config.json vLLM can load; a ServeError naming what it cannot."""
    refuse = "vLLM cannot serve this adapter"
    if config.get("peft_type", "LORA") != "LORA":
        raise ServeError(f"{refuse}: it is {config.get('peft_type')}, vLLM loads LoRA adapters only")
    if config.get("use_dora"):
        raise ServeError(f"{refuse}: DoRA (use_dora) is not supported by vLLM; merge the run and serve the folder")
    if config.get("modules_to_save"):
        raise ServeError(
            f"{refuse}: modules_to_save ({', '.join(config['modules_to_save'])}) are fully trained layers"
        )
    if config.get("bias", "none") != "none":
        raise ServeError(f"{refuse}: trained biases (bias: {config['bias']}) are not loaded by vLLM")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ServeError(f"{refuse}: per-layer ranks (rank_pattern / alpha_pattern) are not supported by vLLM")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise ServeError(f"{refuse}: target_modules is a pattern ({targets!r}); vLLM needs module names")
    unknown = sorted(set(targets) - VLLM_TARGETS)
    if unknown:
        raise ServeError(f"{refuse}: target modules vLLM does not adapt: {', '.join(unknown)}")
    rank = int(config.get("r", 8))
    fitting = [r for r in VLLM_RANKS if r >= rank]
    if not fitting:
        raise ServeError(f"{refuse}: rank {rank} is over vLLM's largest, {VLLM_RANKS[-1]}")
    return fitting[0]
