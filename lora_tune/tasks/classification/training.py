"""Sequence classification on a causal LM base (`task.type: classification`): what it adds to the lifecycle.

transformers' `AutoModelForSequenceClassification` puts a new linear `score` head on the base's last token; the
recipe's method trains it (peft keeps the head trainable and saves it through `modules_to_save`; partial and full
train it directly). Rows are {text_column: str, label_column: one of task.labels}; labels map to ids by their order.
A plain transformers Trainer runs the loop (the SFT arguments are TrainingArguments), with the lifecycle's
callbacks like every task: sealed checkpoints, `save_total_limit`, early stopping, resume, the SIGTERM checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport
from lora_tune.methods import runtime as methods
from lora_tune.model.load import count_quantized_layers, load_classifier
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import LABELS_FILE, RunDir
from lora_tune.tasks.classification.checks import preflight_report
from lora_tune.tasks.classification.data import load_splits, write_labelled_test_split
from lora_tune.training.lifecycle import Launch, TaskData, TaskModel, TaskTraining
from lora_tune.training.trl_args import to_sft_config

HEAD = "score"  # the head transformers' *ForSequenceClassification adds on decoder-only models


class ClassificationTraining(TaskTraining):
    name = "classification"

    def arguments(self, recipe: Recipe, checkpoints: Path, dtype: Any) -> Any:
        return to_sft_config(recipe, checkpoints, dtype)

    def checks(self, recipe: Recipe, tokenizer: Any) -> PreflightReport:
        return preflight_report(recipe, tokenizer)

    def data(self, recipe: Recipe, tokenizer: Any, run: RunDir, launch: Launch) -> TaskData:
        """The labelled rows, tokenized (errors name the file and row before the model loads)."""
        from datasets import Dataset

        train_rows, valid_rows = load_splits(recipe)
        write_labelled_test_split(recipe, run)

        def tokenize(rows: list[dict[str, Any]]) -> Any:
            encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=recipe.training.max_length)
            return Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})

        return TaskData(tokenize(train_rows), tokenize(valid_rows) if valid_rows else None)

    def model(self, recipe: Recipe, tokenizer: Any, launch: Launch) -> TaskModel:
        """The base with a new head; the method freezes or wraps it. peft's SEQ_CLS task keeps `score` trainable
        and saved; the wrapped model goes to the trainer as it is."""
        import transformers

        transformers.set_seed(recipe.training.seed)
        model = load_classifier(recipe, tokenizer)
        quantized_layers = count_quantized_layers(model)
        model, peft_config = methods.prepare_model(recipe, model, task_type="SEQ_CLS")
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        elif recipe.adapter.method == "partial":
            getattr(model, HEAD).requires_grad_(True)
        return TaskModel(model, None, quantized_layers)

    def trainer(
        self, recipe: Recipe, model: TaskModel, args: Any, data: TaskData, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        from transformers import DataCollatorWithPadding, Trainer

        return Trainer(
            model=model.model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
            callbacks=callbacks,
        )

    def save_extras(self, recipe: Recipe, build: Path) -> None:
        (build / LABELS_FILE).write_text(json.dumps(list(recipe.task.labels)), encoding="utf-8")

    def figures(self, recipe: Recipe, final: dict[str, float]) -> dict[str, Any]:
        return {"eval_accuracy": final.get("eval_accuracy")}


def accuracy(prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}
