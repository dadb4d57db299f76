"""More than one process: strategies, the rules that refuse what cannot work, and launching.

lora-tune has no distributed layer of its own. `torchrun` or `accelerate launch` start one process per device; each
runs the same `lora-tune train`, and transformers' Trainer (through accelerate) does DDP, FSDP or DeepSpeed ZeRO.
This module decides which strategy a run uses (the recipe's `distributed:` section or the accelerate config the
launcher was given), refuses combinations that cannot work before any model loads, and builds the launcher command
of `lora-tune train --nproc N`. The steps of a run that depend on the rank are in `lora_tune.training.processes`.

The top of this module imports no ML library: `lora-tune validate` checks recipes with it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_tune.recipe.schema import Recipe

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
SHARDED = ("fsdp", "deepspeed-zero3")  # strategies that shard the frozen base weights across processes
DEEPSPEED_CONFIG_DIR = Path(__file__).parent / "ds_configs"
ACCELERATE_TYPES = {"NO": "ddp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}
LOG_ALL_RANKS_ENV = "LORA_TUNE_LOG_ALL_RANKS"  # 1 = every process logs at INFO (default: only the main one)


class DistributedError(ValueError):
    """A strategy setting that cannot work; `key` is the recipe path the message is about."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------------------------
# Which strategy, and is it compatible with the recipe (pure Python: runs at `lora-tune validate`).


def deepspeed_config_path(strategy: str) -> Path:
    """The DeepSpeed JSON shipped for `deepspeed-zero2` / `deepspeed-zero3` (batch sizes left `auto`)."""
    return DEEPSPEED_CONFIG_DIR / f"{strategy.removeprefix('deepspeed-')}.json"


def strategy_of_accelerate_config(path: str | Path) -> str:
    """ddp / fsdp / deepspeed-zero2 / deepspeed-zero3 as an accelerate config file sets it; errors name the key."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise DistributedError("accelerate_config", f"file '{path}' not found")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DistributedError("accelerate_config", f"'{path}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DistributedError("accelerate_config", f"'{path}': expected a mapping of accelerate settings")
    kind = ACCELERATE_TYPES.get(str(data.get("distributed_type", "NO")))
    if kind is None:
        raise DistributedError(
            "accelerate_config",
            f"'{path}': distributed_type '{data.get('distributed_type')}' is not one of {', '.join(ACCELERATE_TYPES)}",
        )
    if kind != "deepspeed":
        return kind
    ds = data.get("deepspeed_config") or {}
    stage = ds.get("zero_stage") if isinstance(ds, dict) else None
    if isinstance(ds, dict) and ds.get("deepspeed_config_file"):
        json_file = Path(ds["deepspeed_config_file"])
        if not json_file.is_file():
            raise DistributedError(
                "accelerate_config",
                f"'{path}': deepspeed_config_file '{json_file}' not found (relative to the working directory)",
            )
        stage = _zero_stage_of_json(json_file)
    if stage not in (2, 3):
        raise DistributedError(
            "accelerate_config", f"'{path}': deepspeed_config.zero_stage must be 2 or 3, got {stage}"
        )
    return f"deepspeed-zero{stage}"


def _zero_stage_of_json(path: Path) -> int | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["zero_optimization"]["stage"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compatibility_problem(recipe: Recipe, strategy: str) -> tuple[str, str] | None:
    """(recipe key, message) for the first setting `strategy` cannot run with; None when all is well.

    Sources: the peft guides "FSDP" and "DeepSpeed" (QLoRA sections and caveats) and bitsandbytes' "FSDP-QLoRA".
    """
    quant, adapter, training = recipe.quantization, recipe.adapter, recipe.training
    if strategy in SHARDED and quant.bits == 8:
        return (
            "quantization.bits",
            f"8-bit bitsandbytes weights cannot be sharded by {strategy}; use bits: 4 (QLoRA stores its 4-bit "
            "weights in a float dtype that shards) or distributed.strategy: ddp / deepspeed-zero2",
        )
    if strategy in SHARDED and quant.bits == 4 and quant.compute_dtype not in ("auto", recipe.model.dtype):
        return (
            "quantization.compute_dtype",
            f"{strategy} shards 4-bit weights stored in the compute dtype, which must equal model.dtype "
            f"('{recipe.model.dtype}'); set compute_dtype: auto",
        )
    if strategy == "fsdp" and quant.bits == 4 and "8bit" in training.optimizer and training.save_strategy != "no":
        return (
            "training.optimizer",
            f"{training.optimizer} with FSDP-QLoRA fails when a checkpoint is saved (peft FSDP caveats); "
            "use adamw_torch, or save_strategy: no",
        )
    if strategy == "deepspeed-zero3" and adapter.modules_to_save:
        return (
            "adapter.modules_to_save",
            "fully trained modules are not supported with DeepSpeed ZeRO-3 here; use deepspeed-zero2 or fsdp",
        )
    return None


def check_distributed_section(recipe: Recipe) -> None:
    """Recipe-time validation of the `distributed:` section; raises DistributedError naming the key."""
    section = recipe.distributed
    strategy = section.strategy
    if section.accelerate_config is not None:
        if "strategy" in section.model_fields_set:
            raise DistributedError(
                "accelerate_config", "give the strategy once: either strategy or accelerate_config, not both"
            )
        strategy = strategy_of_accelerate_config(section.accelerate_config)
    if section.deepspeed_config is not None:
        if not strategy.startswith("deepspeed"):
            raise DistributedError("deepspeed_config", f"is set but the strategy is '{strategy}', not DeepSpeed")
        check_deepspeed_json(Path(section.deepspeed_config), strategy, key="deepspeed_config")
    problem = compatibility_problem(recipe, strategy)
    if problem is not None:
        raise DistributedError(*problem)


DEEPSPEED_AUTO_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_deepspeed_json(path: Path, strategy: str, key: str = "deepspeed_config") -> dict[str, Any]:
    """Structure of a DeepSpeed JSON as lora-tune uses it: the stage the strategy names, batch sizes left `auto`
    (the recipe's training section is their one source of truth). DeepSpeed itself need not be installed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DistributedError(key, f"cannot read '{path}': {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise DistributedError(key, f"'{path}' is not valid JSON: {exc}") from exc
    stage = (data.get("zero_optimization") or {}).get("stage") if isinstance(data, dict) else None
    if stage != int(strategy[-1]):
        raise DistributedError(key, f"'{path}': zero_optimization.stage is {stage}, but the strategy is {strategy}")
    for name in DEEPSPEED_AUTO_BATCH_KEYS:
        if data.get(name, "auto") != "auto":
            raise DistributedError(
                key, f"'{path}': {name} must be \"auto\" (the recipe's training section sets the batch size)"
            )
    return data


# ---------------------------------------------------------------------------------------------------------------
# The running job: where this process stands (environment variables only: no torch import).


@dataclass(frozen=True)
class Processes:
    """This process's place in the job, as the launcher (torchrun / accelerate launch) set it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def prefix(self) -> str:
        """`[rank 1/4] ` in a multi-process job, nothing otherwise: for error lines and logs."""
        return f"[rank {self.rank}/{self.world_size}] " if self.distributed else ""


def launched_strategy() -> str | None:
    """The strategy `accelerate launch --config_file X` asked for through its environment; None when none."""
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            stage = _zero_stage_of_json(Path(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])) or stage
        return f"deepspeed-zero{stage or 2}"
    return None


def resolve_strategy(recipe: Recipe, procs: Processes | None = None) -> str:
    """The strategy this run uses: the launcher's accelerate config, else the recipe's (they must agree); `ddp`
    for a single process, which the strategy does not concern. Refuses what this machine cannot run."""
    procs = procs or Processes.from_env()
    if not procs.distributed:
        return "ddp"
    section = recipe.distributed
    chosen = strategy_of_accelerate_config(section.accelerate_config) if section.accelerate_config else None
    chosen = chosen or section.strategy
    launched = launched_strategy()
    recipe_chose = "strategy" in section.model_fields_set or section.accelerate_config is not None
    if launched is not None and launched != chosen and recipe_chose:
        raise _runtime_error(f"the recipe asks for {chosen} but the launcher's accelerate config is {launched}")
    strategy = launched or chosen
    problem = compatibility_problem(recipe, strategy)
    if problem is not None:
        raise _runtime_error(problem[1], problem[0])
    _require_engine(strategy)
    return strategy


def _require_engine(strategy: str) -> None:
    """accelerate turns FSDP and DeepSpeed on for GPU process groups only: on the CPU it would quietly run DDP."""
    import importlib.util

    import torch

    if strategy != "ddp" and not torch.cuda.is_available():
        raise _runtime_error(
            f"{strategy} needs CUDA GPUs (accelerate runs CPU processes as DDP only); use strategy: ddp on the CPU"
        )
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise _runtime_error(f"{strategy} needs the deepspeed package: pip install deepspeed")


def _runtime_error(message: str, key: str = "distributed.strategy") -> Exception:
    from lora_tune.errors import RecipeError

    return RecipeError(message, key=key)


def configure_rank_logging(logger: logging.Logger, procs: Processes | None = None) -> None:
    """In a multi-process job every log line names its rank, and only the main process logs below WARNING
    (unless LORA_TUNE_LOG_ALL_RANKS=1), so N processes do not print everything N times."""
    procs = procs or Processes.from_env()
    if not procs.distributed:
        return
    for handler in logger.handlers:
        fmt = handler.formatter._fmt if handler.formatter is not None else "%(message)s"  # noqa: SLF001
        handler.setFormatter(logging.Formatter(procs.prefix() + (fmt or "%(message)s")))
    if not procs.is_main and os.environ.get(LOG_ALL_RANKS_ENV) != "1":
        logger.setLevel(max(logger.level, logging.WARNING))


# ---------------------------------------------------------------------------------------------------------------
# Launching N local processes: `lora-tune train RECIPE --nproc N`.


def launch_command(recipe: Recipe, nproc: int, train_args: Sequence[str]) -> list[str]:
    """The launcher command that runs `lora-tune train` in `nproc` local processes.

    `accelerate launch --config_file` when the recipe names an accelerate config, else torchrun (standalone: a free
    port on this machine). Both start `python -m lora_tune train ...` once per process.
    """
    module = ["-m", "lora_tune", "train", *train_args]
    config = recipe.distributed.accelerate_config
    if config is not None:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                "--num_processes", str(nproc), "--num_machines", "1", *module]  # fmt: skip
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *module]


def run_launcher(command: Sequence[str]) -> int:
    """Run the launcher in the foreground; its exit status is ours. Ctrl-C reaches the whole process group."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(list(command), env=env)
