"""Recipe training section -> TRL's SFTConfig. The only file that spells TRL's (and Trainer's) field names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.config import Recipe

if TYPE_CHECKING:
    import torch
    from trl import SFTConfig

OPTIMIZERS = {"adamw_8bit": "adamw_bnb_8bit"}


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
    import torch
    from trl import SFTConfig

    from lora_tune.data.packing import sft_packing_args

    t = recipe.training
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_length=t.max_length,
        **sft_packing_args(recipe),
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS.get(t.optimizer, t.optimizer),
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
        # Rotation happens in lora_tune.checkpoints, only after a newer checkpoint is sealed complete.
        save_total_limit=None,
        # Tracks the lowest eval loss as state.best_model_checkpoint, which rotation never deletes.
        metric_for_best_model="eval_loss" if t.keep_best_checkpoint else None,
        greater_is_better=False if t.keep_best_checkpoint else None,
        report_to=list(t.report_to) or "none",
        use_cpu=not torch.cuda.is_available(),
        # The data pipeline already tokenized, masked and shuffled; TRL truncates and packs.
        dataset_num_proc=None,
        **checkpointing_args(SFTConfig, t.gradient_checkpointing),
        **mixed_precision_flags(recipe, model_dtype),
    )


def checkpointing_args(config_class: type, enabled: bool) -> dict[str, object]:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; use whichever exists."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {prefix: enabled, f"{prefix}_kwargs": {"use_reentrant": False} if enabled else None}
