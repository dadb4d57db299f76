"""Task head: sequence classification on a causal LM base (`task.type: classification`).

transformers' `AutoModelForSequenceClassification` puts a new linear `score` head on the base's last token; the
recipe's method trains it (peft keeps the head trainable and saves it through `modules_to_save`; partial and full
train it directly). Rows are {text_column: str, label_column: one of task.labels}; labels map to ids by their order.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.errors import DataError
from lora_tune.recipe.load import dump_resolved
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import TEST_SPLIT, prepare_run_dir, replace_dir_atomic, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from lora_tune.training.sft import RunResult

log = logging.getLogger(__name__)

LABELS_FILE = "labels.json"
HEAD = "score"  # the head transformers' *ForSequenceClassification adds on decoder-only models


def encode_rows(recipe: Recipe, rows: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """{text, label name or id} -> {text, label id}; a missing column or an unknown label names the file and row."""
    task = recipe.task
    ids = {name: i for i, name in enumerate(task.labels)}
    out = []
    for number, row in enumerate(rows, start=1):
        text, label = row.get(task.text_column), row.get(task.label_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError("expected non-empty text", file=source, row=number, field=task.text_column)
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(task.labels):
            label = task.labels[label]  # datasets that store class ids (e.g. imdb's 0/1) in task.labels' order
        if str(label) not in ids:
            raise DataError(
                f"label {label!r} is not one of task.labels ({', '.join(task.labels)}) nor a class id below "
                f"{len(task.labels)}",
                file=source,
                row=number,
                field=task.label_column,
            )
        out.append({"text": text, "label": ids[str(label)]})
    return out


def load_splits(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and validation rows (validation from eval_datasets, or val_size held out under the seed)."""
    from lora_tune.data.sources import load_rows

    train = [r for d in recipe.datasets for r in encode_rows(recipe, load_rows(d), d.path)]
    valid = [r for d in recipe.eval_datasets for r in encode_rows(recipe, load_rows(d), d.path)]
    if recipe.val_size > 0:
        random.Random(recipe.training.seed).shuffle(train)
        cut = max(1, round(len(train) * recipe.val_size))
        train, valid = train[cut:], train[:cut]
    return train, valid


def write_labelled_test_split(recipe: Recipe, run_root: Path) -> Path | None:
    """The recipe's test_datasets as the run's test.jsonl ({text_column, label_column} rows), for `lora-tune eval`."""
    from lora_tune.data.sources import load_rows

    task = recipe.task
    rows = [r for d in recipe.test_datasets for r in encode_rows(recipe, load_rows(d), d.path)]
    if not rows:
        return None
    path = run_root / TEST_SPLIT
    lines = [json.dumps({task.text_column: r["text"], task.label_column: task.labels[r["label"]]}) for r in rows]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def load_classifier(recipe: Recipe, tokenizer: Any, *, inference: bool = False) -> Any:
    """The base with a fresh classification head, quantized as the recipe says (4-bit packing: see load_model)."""
    from transformers import AutoModelForSequenceClassification

    from lora_tune.model.load import ModelLoadError, build_bnb_config, device_map, resolve_dtype, settle_4bit_packing

    labels = list(recipe.task.labels)
    dtype = resolve_dtype(recipe.model.dtype)
    bnb_config = build_bnb_config(recipe.quantization, dtype)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            recipe.model.name,
            revision=recipe.model.revision,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            dtype=dtype,
            quantization_config=bnb_config,
            trust_remote_code=recipe.model.trust_remote_code,
            device_map=device_map(),
            use_safetensors=True,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"model.name: cannot load '{recipe.model.name}' for classification: {exc}") from exc
    settle_4bit_packing(model, inference)
    # The head reads the last non-padding token, which it finds through the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if bnb_config is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.gradient_checkpointing
        )
    return model


def train_classifier(recipe: Recipe, *, overwrite: bool = False) -> RunResult:
    """Train the head (and the recipe's adapter or layers) on labelled text; report accuracy."""
    started = time.monotonic()
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer

    from lora_tune.check import PREFLIGHT_FILE, preflight
    from lora_tune.methods import runtime as methods
    from lora_tune.model.load import load_tokenizer, resolve_dtype
    from lora_tune.training.log import last_value, metrics_callback, peak_memory, plot_loss, read_metrics
    from lora_tune.training.sft import RunResult, count_quantized_layers
    from lora_tune.training.trl_args import to_sft_config

    # 1. Run directory, resolved recipe, lineage.
    run = prepare_run_dir(recipe.output_dir, overwrite=overwrite)
    write_text_atomic(run.recipe, dump_resolved(recipe))
    write_json_atomic(run.root / methods.LINEAGE_FILE, methods.lineage(recipe))

    # 2. Tokenizer and labelled rows (errors name the file and row before the model loads).
    tokenizer = load_tokenizer(recipe.model)
    preflight(recipe, tokenizer, run.root / PREFLIGHT_FILE)  # labels present, truncation; writes preflight.json
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
        build = run.root / ".adapter.tmp"
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
        result.loss_plot = plot_loss(records, run.loss_plot, title=f"{Path(recipe.output_dir).name}: loss")
        write_json_atomic(run.summary, {**result.to_json(), "eval_accuracy": metrics.get("eval_accuracy")})
    return result


def preflight_report(recipe: Recipe, tokenizer: Any) -> Any:
    """`lora-tune check` for a classification recipe: every row has text and a known label (a DataError names the
    first bad one); reports the label counts and how many texts max_length truncates."""
    from collections import Counter

    from lora_tune.check.report import CheckResult, PreflightReport

    train, valid = load_splits(recipe)
    counts = Counter(recipe.task.labels[r["label"]] for r in train)
    lengths = [len(ids) for ids in tokenizer([r["text"] for r in train])["input_ids"]]
    limit = recipe.training.max_length
    truncated = sum(n > limit for n in lengths) if limit else 0
    checks = [
        CheckResult(
            "labels", "pass", "train rows per label: " + ", ".join(f"{k} {counts[k]}" for k in recipe.task.labels)
        ),
        CheckResult(
            "truncation",
            "warn" if truncated else "pass",
            f"{truncated} of {len(lengths)} texts are longer than max_length {limit}",
            fix="raise training.max_length" if truncated else None,
            count=truncated,
        ),
    ]
    if min(counts[k] for k in recipe.task.labels) == 0:
        missing = [k for k in recipe.task.labels if counts[k] == 0]
        checks.append(CheckResult("labels-present", "fail", f"no training rows for {', '.join(missing)}"))
    sources = {d.path: {"rows": len(train) + len(valid), "checked": len(train) + len(valid)} for d in recipe.datasets}
    return PreflightReport(
        checks=checks,
        rows=len(train),
        sources=sources,
        tokens=sum(lengths),
        trained_tokens=0,
        stop_tokens=[],
        generation_stop_tokens=None,
        generation_config="not used by classification",
        chat_template_sha256="",
        max_length=limit,
        longest_example=max(lengths, default=0),
    )


def accuracy(prediction: Any) -> dict[str, float]:
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}
