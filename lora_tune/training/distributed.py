"""More than one process: strategies, the rules that refuse what cannot work, and launching.

lora-tune has no distributed layer of its own. `torchrun` or `accelerate launch` start one process per device; each
runs the same `lora-tune train`, and transformers' Trainer (through accelerate) does DDP, FSDP or DeepSpeed ZeRO.
This module decides which strategy a run uses (the recipe's `distributed:` section or the accelerate config the
launcher was given), refuses combinations that cannot work before any model loads, and builds the launcher command
of `lora-tune train --nproc N`. The steps of a run that depend on the rank are in `lora_tune.training.processes`.

The top of this module imports no ML library: `lora-tune validate` checks recipes with it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.errors import RecipeError
from lora_tune.recipe.strategy import _zero_stage_of_json, compatibility_problem, strategy_of_accelerate_config

if TYPE_CHECKING:
    from lora_tune.recipe.schema import Recipe

log = logging.getLogger(__name__)

DEEPSPEED_CONFIG_DIR = Path(__file__).parent / "ds_configs"
LOG_ALL_RANKS_ENV = "LORA_TUNE_LOG_ALL_RANKS"  # 1 = every process logs at INFO (default: only the main one)


# ---------------------------------------------------------------------------------------------------------------
# Which strategy, and is it compatible with the recipe (pure Python: runs at `lora-tune validate`).


def deepspeed_config_path(strategy: str) -> Path:
    """The DeepSpeed JSON shipped for `deepspeed-zero2` / `deepspeed-zero3` (batch sizes left `auto`)."""
    return DEEPSPEED_CONFIG_DIR / f"{strategy.removeprefix('deepspeed-')}.json"


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
