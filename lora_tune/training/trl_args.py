"""Recipe training section -> TRL's SFTConfig, its preference configs (DPO, KTO, ORPO, CPO/SimPO) and its online RL
configs (GRPO, RLOO). The only file that spells TRL's (and Trainer's) field names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.data.packing import sft_packing_args
from lora_tune.recipe.rules import OBJECTIVES
from lora_tune.recipe.schema import Recipe
from lora_tune.training.distributed import Processes, deepspeed_config_path, launched_strategy, resolve_strategy
from lora_tune.training.levers import run_shape

if TYPE_CHECKING:
    import torch
    from trl import SFTConfig

OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit"}
# preference.beta when a recipe sets none, by objective (recipe.rules.OBJECTIVES: the papers' and TRL's defaults)
DEFAULT_BETA = {name: needs.default_beta for name, needs in OBJECTIVES.items() if needs.default_beta is not None}


def mixed_precision_flags(recipe: Recipe, model_dtype: torch.dtype) -> dict[str, bool]:
    """bf16/fp16 autocast only on a GPU; `auto` follows the model dtype."""
    import torch

    choice = recipe.training.mixed_precision
    if choice == "auto":
        if not torch.cuda.is_available():
            return {"bf16": False, "fp16": False}
        choice = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model_dtype, "no")
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def to_sft_config(recipe: Recipe, checkpoint_dir: Path, model_dtype: torch.dtype) -> SFTConfig:
    from trl import SFTConfig

    return SFTConfig(
        **trainer_fields(recipe, checkpoint_dir, model_dtype, SFTConfig),
        max_length=recipe.training.max_length,
        **sft_packing_args(recipe),
        # The data pipeline already tokenized, masked and shuffled; TRL truncates and packs.
        dataset_num_proc=None,
    )


def to_preference_config(recipe: Recipe, checkpoint_dir: Path, model_dtype: torch.dtype) -> Any:
    """DPOConfig, KTOConfig, ORPOConfig or CPOConfig (SimPO is CPO's `simpo` loss without its SFT term) for the
    recipe's training.objective, with the objective's `preference:` settings."""
    config_class = preference_classes(recipe.training.objective)[1]
    p, objective = recipe.preference, recipe.training.objective
    fields: dict[str, Any] = {key: getattr(p, key) for key in OBJECTIVES[objective].preference_keys}
    fields["beta"] = p.beta if p.beta is not None else DEFAULT_BETA[objective]
    if objective == "dpo":
        fields["loss_type"] = [p.loss_type]  # TRL's DPO takes a list of losses (weighted when several)
    if objective == "simpo":
        fields |= {"loss_type": "simpo", "cpo_alpha": 0.0}  # CPO's SimPO loss, without CPO's SFT term
    return config_class(
        **trainer_fields(recipe, checkpoint_dir, model_dtype, config_class),
        max_length=recipe.training.max_length,
        **fields,
    )


def to_rl_config(recipe: Recipe, checkpoint_dir: Path, model_dtype: torch.dtype) -> Any:
    """GRPOConfig or RLOOConfig for the recipe's online RL objective, with the objective's `rl:` settings."""
    objective, rl = recipe.training.objective, recipe.rl
    config_class = rl_classes(objective)[1]
    fields: dict[str, Any] = {
        "num_generations": rl.num_generations,
        "max_completion_length": rl.max_completion_length,
        "temperature": rl.temperature,
        "top_p": rl.top_p,
        "beta": rl.beta if rl.beta is not None else DEFAULT_BETA[objective],
        "steps_per_generation": rl.steps_per_generation,
        "reward_weights": [reward.weight for reward in rl.rewards],
        "use_vllm": rl.use_vllm,
        "vllm_mode": rl.vllm_mode,
        "log_completions": False,  # the run writes completions.jsonl itself (tasks/rl/training.py)
        **_thinking(recipe),
    }
    if objective == "grpo":
        fields |= {"loss_type": rl.loss_type, "scale_rewards": rl.scale_rewards}
    else:
        fields["normalize_advantages"] = rl.normalize_advantages
    return config_class(**trainer_fields(recipe, checkpoint_dir, model_dtype, config_class), **fields)


def _thinking(recipe: Recipe) -> dict[str, Any]:
    """The template's enable_thinking when the recipe fixes it (data.thinking on/off); auto leaves its default."""
    choice = recipe.data.thinking
    return {} if choice == "auto" else {"chat_template_kwargs": {"enable_thinking": choice == "on"}}


def rl_classes(objective: str) -> tuple[type, type]:
    """(trainer class, config class) of an online RL objective."""
    if objective == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOTrainer, GRPOConfig
    from trl import RLOOConfig, RLOOTrainer

    return RLOOTrainer, RLOOConfig


def preference_classes(objective: str) -> tuple[type, type]:
    """(trainer class, config class) of a preference objective; ORPO and CPO live in trl.experimental in trl 1.x."""
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer, CPOConfig


def trainer_fields(
    recipe: Recipe, checkpoint_dir: Path, model_dtype: torch.dtype, config_class: type
) -> dict[str, Any]:
    """The transformers Trainer settings every objective shares: schedule, batch shape, logging, saving, devices."""
    import torch

    t = recipe.training
    shape, optimizer = run_shape(recipe, model_dtype)
    return dict(
        output_dir=str(checkpoint_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=shape.batch_size,
        per_device_eval_batch_size=shape.eval_batch_size,
        gradient_accumulation_steps=shape.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS.get(optimizer, optimizer),
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        # transformers hides the progress bar when its log level is above WARNING, which the CLI sets to keep the
        # console readable; the bar is wanted regardless.
        disable_tqdm=False,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        # Rotation happens in lora_tune.training.checkpoints, only after a newer checkpoint is sealed complete, and
        # never deletes state.best_model_checkpoint (tracked when a validation metric picks the best:
        # best_checkpoint_args).
        save_total_limit=None,
        report_to=list(t.report_to) or "none",
        **best_checkpoint_args(recipe),
        use_cpu=not torch.cuda.is_available(),
        **checkpointing_args(config_class, t.gradient_checkpointing),
        **(
            {"activation_offloading": t.activation_offloading and torch.cuda.is_available()}
            if "activation_offloading" in config_class.__dataclass_fields__
            else {}
        ),
        **mixed_precision_flags(recipe, model_dtype),
        **distributed_args(recipe),
    )


def distributed_args(recipe: Recipe) -> dict[str, object]:
    """The recipe's strategy as Trainer fields, in a multi-process job. Under `accelerate launch --config_file` the
    launcher's config governs instead (accelerate reads it from the environment): nothing is set for FSDP /
    DeepSpeed here then."""
    import torch

    # LoRA uses every adapter weight in each forward: no unused-parameter search (an extra graph walk per step).
    args: dict[str, object] = {"ddp_find_unused_parameters": False}
    if not Processes.from_env().distributed:
        return args  # a backend given to a single process would make accelerate start a process group
    strategy = resolve_strategy(recipe)
    if not torch.cuda.is_available():
        args["ddp_backend"] = "gloo"  # the CPU's process group (NCCL needs GPUs)
    if launched_strategy() is not None or strategy == "ddp":
        return args
    if strategy == "fsdp":
        quantized = recipe.quantization.bits == 4
        args["fsdp"] = True
        args["fsdp_config"] = {
            # FSDP1's flat parameters shard bitsandbytes' Params4bit stored in a float dtype; FSDP2 + QLoRA is not
            # yet dependable in accelerate. Unquantized LoRA uses FSDP2.
            "version": 1 if quantized else 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",  # the model's _no_split_modules: its decoder layers
            "cpu_ram_efficient_loading": True,  # rank 0 reads the weights; the others get them by broadcast
            "sync_module_states": True,
            "use_orig_params": False,
            "state_dict_type": "SHARDED_STATE_DICT",
        }
        return args
    args["deepspeed"] = str(recipe.distributed.deepspeed_config or deepspeed_config_path(strategy))
    return args


def checkpointing_args(config_class: type, enabled: bool) -> dict[str, object]:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; use whichever exists."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}


def best_checkpoint_args(recipe: Recipe) -> dict[str, object]:
    """Which validation metric is "best", whether the final model is the best checkpoint, the plateau schedule."""
    t = recipe.training
    args: dict[str, object] = {}
    if not t.keeps_best and t.lr_scheduler != "reduce_lr_on_plateau":
        # Left unset otherwise: with a metric_for_best_model, transformers also changes which checkpoints
        # save_total_limit keeps (the best one survives), which a plain run should not do.
        return args
    args["metric_for_best_model"] = t.best_metric
    args["greater_is_better"] = t.best_metric != "loss"
    args["load_best_model_at_end"] = t.keeps_best
    if t.lr_scheduler == "reduce_lr_on_plateau":
        # transformers steps torch's ReduceLROnPlateau with metric_for_best_model after each evaluation; its mode
        # must follow the metric's direction (torch's default, "min", suits a loss only).
        args["lr_scheduler_kwargs"] = {
            "mode": "max" if t.best_metric != "loss" else "min",
            "patience": t.plateau_patience,
            "factor": t.plateau_factor,
        }
    return args


def early_stopping_callbacks(recipe: Recipe) -> list[object]:
    """transformers' EarlyStoppingCallback when the recipe asks for early stopping (none otherwise)."""
    t = recipe.training
    if t.early_stopping_patience is None:
        return []
    from transformers import EarlyStoppingCallback

    return [
        EarlyStoppingCallback(
            early_stopping_patience=t.early_stopping_patience, early_stopping_threshold=t.early_stopping_threshold
        )
    ]
