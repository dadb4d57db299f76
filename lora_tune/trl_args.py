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
        packing=t.packing,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS.get(t.optimizer, t.optimizer),
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=list(t.report_to) or "none",
        use_cpu=not torch.cuda.is_available(),
        # The data pipeline already tokenized, masked and shuffled; TRL truncates and packs.
        dataset_num_proc=None,
        **mixed_precision_flags(recipe, model_dtype),
    )
