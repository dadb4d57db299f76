"""Task head: sequence classification on a causal LM base (`task.type: classification`).

transformers' `AutoModelForSequenceClassification` puts a new linear `score` head on the base's last token; the
recipe's method trains it (peft keeps the head trainable and saves it through `modules_to_save`; partial and full
train it directly). Rows are {text_column: str, label_column: one of task.labels}; labels map to ids by their order.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from lora_tune.check import PREFLIGHT_FILE, preflight
from lora_tune.check.labels import preflight_report
from lora_tune.data.labels import load_splits, write_labelled_test_split
from lora_tune.methods import runtime as methods
from lora_tune.model.load import count_quantized_layers, load_classifier, load_tokenizer, resolve_dtype
from lora_tune.recipe.load import dump_resolved
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import LABELS_FILE, adapter_build_dir, prepare_run_dir, write_json_atomic, write_text_atomic
from lora_tune.run.outputs import replace_dir_atomic
from lora_tune.training.log import last_value, metrics_callback, peak_memory, plot_loss, read_metrics
from lora_tune.training.result import RunResult
from lora_tune.training.trl_args import to_sft_config

if TYPE_CHECKING:
    from lora_tune.training.result import RunResult

log = logging.getLogger(__name__)

HEAD = "score"  # the head transformers' *ForSequenceClassification adds on decoder-only models


def train_classifier(recipe: Recipe, *, overwrite: bool = False) -> RunResult:
    """Train the head (and the recipe's adapter or layers) on labelled text; report accuracy."""
    started = time.monotonic()
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    # 1. Run directory, resolved recipe, lineage.
    run = prepare_run_dir(recipe.output_dir, overwrite=overwrite, reads=recipe.local_sources)
    write_text_atomic(run.recipe, dump_resolved(recipe))
    write_json_atomic(run.root / methods.LINEAGE_FILE, methods.lineage(recipe))

    # 2. Tokenizer and labelled rows (errors name the file and row before the model loads).
    tokenizer = load_tokenizer(recipe.model)
    preflight(
        recipe, tokenizer, run.root / PREFLIGHT_FILE, preflight_report
    )  # labels present, truncation; writes preflight.json
    train_rows, valid_rows = load_splits(recipe)
    write_labelled_test_split(recipe, run.root)

    def tokenize(rows: list[dict[str, Any]]) -> Any:
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=recipe.training.max_length)
        return Dataset.from_dict({**encoded, "labels": [r["label"] for r in rows]})

    train_set = tokenize(train_rows)
    eval_set = tokenize(valid_rows) if valid_rows else None

    # 3. Model with a new head; the method freezes/wraps it. peft's SEQ_CLS task keeps `score` trainable and saved.
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

    # 4. Train with a plain transformers Trainer (the SFT arguments are TrainingArguments).
    args = to_sft_config(recipe, run.checkpoints, resolve_dtype(recipe.model.dtype))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[metrics_callback(run.metrics)],
    )
    methods.attach(recipe, trainer, run.root)
    output = trainer.train()
    metrics = trainer.evaluate() if eval_set is not None else {}

    # 5. Save the artefact and the label names beside it.
    if trainer.is_world_process_zero():
        build = adapter_build_dir(run)
        methods.save_artifact(recipe, trainer, tokenizer, build, run.root)
        (build / LABELS_FILE).write_text(json.dumps(list(recipe.task.labels)), encoding="utf-8")
        replace_dir_atomic(build, run.root / methods.artifact_name(recipe))

    # 6. Summary.
    records = read_metrics(run.metrics)
    trainable, total = methods.parameter_counts(trainer.model)
    result = RunResult(
        run_dir=run.root,
        adapter_dir=run.root / methods.artifact_name(recipe),
        steps=output.global_step,
        train_loss=last_value(records, "loss"),
        eval_loss=metrics.get("eval_loss"),
        tokens_seen=None,
        trained_token_share=None,
        train_rows=len(train_set),
        validation_rows=len(eval_set) if eval_set is not None else 0,
        trainable_parameters=trainable,
        quantized_layers=quantized_layers,
        wall_seconds=round(time.monotonic() - started, 1),
        memory=peak_memory(),
        method=recipe.adapter.method,
        total_parameters=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
    )
    log.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, result.trainable_percent)
    if trainer.is_world_process_zero():
        result.loss_plot = plot_loss(records, run.loss_plot, title=f"{run.root.name}: loss")
        write_json_atomic(run.summary, {**result.to_json(), "eval_accuracy": metrics.get("eval_accuracy")})
    return result


def accuracy(prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}
