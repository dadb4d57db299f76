"""Which multi-process strategy a recipe runs with, and the settings it cannot run with (refused at validation;
torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_tune.recipe.schema import Recipe


STRATEGIES = ("ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")


SHARDED = ("fsdp", "deepspeed-zero3")  # strategies that shard the frozen base weights across processes


ACCELERATE_TYPES = {"NO": "ddp", "MULTI_GPU": "ddp", "MULTI_CPU": "ddp", "FSDP": "fsdp", "DEEPSPEED": "deepspeed"}


class DistributedError(ValueError):
    """A strategy setting that cannot work; `key` is the recipe path the message is about."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


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
