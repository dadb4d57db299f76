"""Supervised fine-tuning on chat data (`task.type: sft`, `training.objective: sft`): what SFT adds to the lifecycle.

Its data is the shared pipeline's tokenized, assistant-masked splits (lora_tune.data), packed when the recipe packs,
tokenized once by the main process of a multi-process run; its model is the base with the speed levers (Liger, the
per-example attention of packed rows); TRL's SFTTrainer runs the loop, peft wraps the model with the adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport, run_checks
from lora_tune.data import write_test_split
from lora_tune.data.packing import log_batching, packing_plan
from lora_tune.methods import runtime as methods
from lora_tune.model.attention import use_varlen_attention
from lora_tune.model.load import count_quantized_layers, load_model, resolve_dtype
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir
from lora_tune.training import processes
from lora_tune.training.levers import apply_liger, describe_levers
from lora_tune.training.lifecycle import Launch, TaskData, TaskModel, TaskTraining, on_gpu
from lora_tune.training.trl_args import to_sft_config

log = logging.getLogger(__name__)


class SftTraining(TaskTraining):
    name = "sft"
    processes = True

    def arguments(self, recipe: Recipe, checkpoints: Path, dtype: Any) -> Any:
        return to_sft_config(recipe, checkpoints, dtype)

    def packed(self, recipe: Recipe) -> bool:
        return packing_plan(recipe).enabled

    def checks(self, recipe: Recipe, tokenizer: Any) -> PreflightReport:
        return run_checks(recipe, tokenizer)

    def data(self, recipe: Recipe, tokenizer: Any, run: RunDir, launch: Launch) -> TaskData:
        prepared = processes.prepare_data(recipe, tokenizer, run, launch.procs)
        _log_data(recipe, launch, prepared)
        if launch.procs.is_main:
            write_test_split(prepared, run)
        return TaskData(
            prepared.datasets["train"],
            prepared.datasets.get("validation"),
            {"trained_token_share": round(prepared.stats.train.trained_share, 4)},
        )

    def model(self, recipe: Recipe, tokenizer: Any, launch: Launch) -> TaskModel:
        """The base (seeded; quantized, on this process's device), the method applied (frozen layers, or the peft
        config TRL applies), Liger and the attention kernel chosen."""
        import transformers

        transformers.set_seed(recipe.training.seed)
        processes.set_loading_environment(launch.strategy, launch.procs)
        model = load_model(recipe.model, recipe.quantization, recipe.training, launch.strategy)
        quantized_layers = count_quantized_layers(model)
        model, peft_config = methods.prepare_model(recipe, model)
        if recipe.training.liger:
            apply_liger(model)
        attention = use_varlen_attention(model, recipe, packed=launch.packed)
        log.info("speed: %s", describe_levers(recipe, resolve_dtype(recipe.model.dtype), attention))
        return TaskModel(model, peft_config, quantized_layers)

    def trainer(
        self, recipe: Recipe, model: TaskModel, args: Any, data: TaskData, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        from trl import SFTTrainer

        return SFTTrainer(
            model=model.model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            peft_config=model.peft_config,
            callbacks=callbacks,
        )


def _log_data(recipe: Recipe, launch: Launch, prepared: Any) -> None:
    """The batch shape, what the pipeline kept and dropped, and the padding share of packed and padded batches."""
    where = launch.strategy if launch.procs.distributed else "one process"
    log.info("%s (%s)", processes.describe_batch(*launch.batch, launch.packed), where)
    log.info("data: %s", prepared.stats.summary().replace("\n", "; "))
    lengths = [len(ids) for ids in prepared.datasets["train"]["input_ids"]]
    log_batching(recipe, lengths, on_gpu=on_gpu())
