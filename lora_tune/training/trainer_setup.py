"""What every lora-tune trainer gets besides TRL's arguments, whatever its objective: the callbacks that log,
seal checkpoints, stop on a signal or a non-finite loss, and the preparation before the first step."""

from __future__ import annotations

from typing import Any

from lora_tune.methods import runtime as methods
from lora_tune.model.dtype import keep_trainable_dtypes
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir
from lora_tune.training.checkpoints import checkpoint_callback
from lora_tune.training.divergence import Divergence, divergence_callback
from lora_tune.training.faults import check_free_disk
from lora_tune.training.log import metrics_callback, use_compact_progress
from lora_tune.training.resume import evaluation_keeps_rng
from lora_tune.training.signals import StopRequest, stop_callback
from lora_tune.training.trl_args import early_stopping_callbacks


def run_callbacks(recipe: Recipe, run: RunDir, stop: StopRequest, diverged: Divergence) -> list[Any]:
    """The training log, early stopping, sealed checkpoints with rotation, graceful stop, and the divergence stop."""
    return [
        metrics_callback(run.metrics),
        *early_stopping_callbacks(recipe),
        checkpoint_callback(run.checkpoints, recipe.training.save_total_limit),
        stop_callback(stop),
        divergence_callback(diverged),  # last: it cancels a save the others asked for at a non-finite step
    ]


def prepare_trainer(trainer: Any, recipe: Recipe, run: RunDir) -> None:
    """What TRL's trainer needs besides its arguments, before the first step."""
    evaluation_keeps_rng(trainer)  # so a run resumed at an epoch's end shuffles the next epoch as the unbroken one
    methods.attach(recipe, trainer, run)  # LoRA+ optimizer, AdaLoRA budget, PiSSA/LoftQ initialisation
    keep_trainable_dtypes(trainer)  # a resumed QLoRA adapter trains in bfloat16 again, as before the kill
    check_free_disk(run.root, recipe, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    use_compact_progress(trainer)
