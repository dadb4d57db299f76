"""Vision-language fine-tuning (a recipe with `vision:`): an SFT run whose conversations hold images.

What it adds to the lifecycle: rows with images (lora_tune.data.vision) instead of the text pipeline; the base loaded
as an image-text-to-text model with its processor, 4-bit on the language side only (lora_tune.model.vision); LoRA on
the language model's linear layers (plus the projector in full, or LoRA on the vision tower, as `vision:` says);
TRL's SFTTrainer with the processor as its processing class and a collator that renders each batch with the
processor and labels it with the one masking owner (assistant turns only, image tokens never). Never packed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport
from lora_tune.data.vision import VisionCollator
from lora_tune.methods import runtime as methods
from lora_tune.model.load import count_quantized_layers, resolve_dtype
from lora_tune.model.vision import describe_parts, load_processor, load_vision_model, lora_targets, saved_modules
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir
from lora_tune.tasks.vision.checks import vision_checks
from lora_tune.tasks.vision.data import load_vision_splits
from lora_tune.training.lifecycle import Launch, TaskData, TaskModel, TaskTraining, row_data
from lora_tune.training.trl_args import to_sft_config

log = logging.getLogger(__name__)


class VisionTraining(TaskTraining):
    name = "vision"
    processes = False

    def arguments(self, recipe: Recipe, checkpoints: Path, dtype: Any) -> Any:
        return to_sft_config(recipe, checkpoints, dtype)  # packing off: lora_tune.data.packing.packing_plan

    def checks(self, recipe: Recipe, tokenizer: Any) -> PreflightReport:
        return vision_checks(recipe, load_processor(recipe.model))

    def data(self, recipe: Recipe, tokenizer: Any, run: RunDir, launch: Launch) -> TaskData:
        splits = load_vision_splits(recipe)
        images = sum(len(r.images) for r in splits.train)
        return row_data(
            run,
            [r.to_json() for r in splits.train],
            [r.to_json() for r in splits.validation],
            [r.to_file_row() for r in splits.test],
            f"rows with images ({images} training images)",
        )

    def model(self, recipe: Recipe, tokenizer: Any, launch: Launch) -> TaskModel:
        import transformers

        assert recipe.vision is not None
        transformers.set_seed(recipe.training.seed)
        model = load_vision_model(
            recipe.model, recipe.quantization, gradient_checkpointing=recipe.training.gradient_checkpointing
        )
        quantized = count_quantized_layers(model)
        model, config = methods.prepare_model(recipe, model)
        if config is not None:
            if recipe.adapter.target_modules == "all-linear":
                config.target_modules = lora_targets(model, recipe.vision)
            extra = saved_modules(model, recipe.vision)
            if extra:
                config.modules_to_save = [*(config.modules_to_save or []), *extra]
        log.info(
            "vision: parameters %s; 4-bit layers %d (language model only)",
            json.dumps(describe_parts(model)),
            quantized,
        )
        return TaskModel(model, config, quantized)

    def trainer(
        self, recipe: Recipe, model: TaskModel, args: Any, data: TaskData, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        from trl import SFTTrainer

        processor = load_processor(recipe.model)
        assert recipe.vision is not None
        trainer = SFTTrainer(
            model=model.model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=processor,
            data_collator=VisionCollator(processor, recipe.training.max_length, recipe.vision.max_image_side),
            peft_config=model.peft_config,
            callbacks=callbacks,
        )
        # TRL casts every trainable parameter of a quantized model to bfloat16 (QLoRA's adapters); a projector trained
        # in full then meets the tower's features in the model dtype. It trains in the model dtype instead.
        dtype = resolve_dtype(recipe.model.dtype)
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and "modules_to_save" in name:
                param.data = param.data.to(dtype)
        return trainer

    def save_extras(self, recipe: Recipe, build: Path) -> None:
        """The processor (image processor, its chat template) beside the adapter: eval, chat and merge load it."""
        load_processor(recipe.model).save_pretrained(build)
