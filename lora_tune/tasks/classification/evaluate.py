"""Evaluating a classification-head run (`task.type: classification`): the head predicts (argmax of its logits),
nothing is generated. Rows carry the recipe's text and label columns, from `--data FILE` or the run's test.jsonl.

The base model's side is not reported: its head is new and untrained, so its predictions say nothing about the
base. The report puts the tuned head next to the majority-class baseline instead (always predicting the label
most frequent in the evaluated rows), which is what a head must beat to have learnt anything.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.data.sources import load_rows
from lora_tune.evaluate.report import (
    class_score,
    confusion_lines,
    markdown_table,
    number,
    per_class_lines,
    percent,
    table_cell,
)
from lora_tune.evaluate.result import EvalReport, Score
from lora_tune.evaluate.run import Evaluation, write_report
from lora_tune.evaluate.scores import classification_scores
from lora_tune.inference.load import load_model_folder, run_artifact
from lora_tune.model.load import load_classifier, load_tokenizer
from lora_tune.recipe.schema import DatasetConfig
from lora_tune.run.layout import EVAL_JSON, EVAL_MARKDOWN, LABELS_FILE, MODEL_DIR
from lora_tune.tasks.classification.data import encode_rows

if TYPE_CHECKING:
    from lora_tune.evaluate.result import EvalReport
    from lora_tune.recipe.schema import Recipe
    from lora_tune.run.layout import RunDir

TASK = "head"
NOTE = (
    "Classification head: labels are the argmax of the head's logits. The base model is not scored (its head is "
    "untrained); the majority-class baseline always predicts the label most frequent in these rows."
)


def evaluate_head_run(
    evaluation: Evaluation, *, base: bool = True, limit: int | None = None, progress: bool = True
) -> EvalReport:
    """The classification task's `lora-tune eval`: the head's scores (and, with `base`, the majority-class baseline);
    writes eval.json and eval.md. Predictions come in batches without a progress bar (`progress` is unused)."""
    ev = evaluation
    report = evaluate_head(ev.run, ev.recipe, ev.path, limit=limit, batch_size=ev.settings.batch_size, baseline=base)
    write_report(ev.run, report, format_head_markdown)
    return report


def evaluate_head(
    run: RunDir, recipe: Recipe, path: Path, *, limit: int | None, batch_size: int, baseline: bool
) -> EvalReport:
    """Scores of the tuned head (and the majority-class baseline) on labelled rows from `path`."""
    rows = encode_rows(recipe, load_rows(DatasetConfig(path=str(path), limit=limit)), str(path))
    model, tokenizer, labels = load_head_model(run, recipe)
    predicted = predict(model, tokenizer, [r["text"] for r in rows], batch_size, recipe.training.max_length)
    true = [labels[r["label"]] for r in rows]
    report = EvalReport(
        data=str(path),
        rows=len(rows),
        tuned=_score([labels[p] for p in predicted], true, labels),
        task=TASK,
        labels=labels,
        settings={"batch_size": batch_size, "max_length": recipe.training.max_length},
        note=NOTE,
    )
    if baseline and true:
        majority = Counter(true).most_common(1)[0][0]
        report.baseline = _score([majority] * len(true), true, labels)
    report.examples = [
        {"input": r["text"], "reference": t, "tuned": labels[p]}
        for r, t, p in list(zip(rows, true, predicted, strict=True))[: recipe.eval.examples]
    ]
    return report


def _score(predicted: list[str], true: list[str], labels: list[str]) -> Any:
    scores = classification_scores(predicted, true, labels).to_json()
    # Exact match of a predicted label is its accuracy; a head has no generated text to normalise.
    return Score(exact_match=scores["accuracy"], normalized_exact_match=scores["accuracy"], classification=scores)


def load_head_model(run: RunDir, recipe: Recipe) -> tuple[Any, Any, list[str]]:
    """The tuned classifier, its tokenizer and its label names (labels.json beside the artefact)."""
    import json

    artifact = run_artifact(run)
    labels_file = artifact / LABELS_FILE
    labels = json.loads(labels_file.read_text(encoding="utf-8")) if labels_file.is_file() else list(recipe.task.labels)
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"tokenizer": str(artifact), "chat_template": None}))
    if artifact.name == MODEL_DIR:
        model = load_model_folder(artifact, recipe.model.dtype, "AutoModelForSequenceClassification")
    else:
        from peft import PeftModel

        # The base with a head of len(labels) outputs; the adapter carries the trained head (modules_to_save).
        model = PeftModel.from_pretrained(load_classifier(recipe, tokenizer, inference=True), artifact)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-padding token
    model.eval()
    return model, tokenizer, labels


def predict(model: Any, tokenizer: Any, texts: list[str], batch_size: int, max_length: int | None) -> list[int]:
    """The head's class id for each text, in batches."""
    import torch

    device = next(model.parameters()).device
    out: list[int] = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=max_length is not None,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        with torch.no_grad():
            out += model(**batch).logits.argmax(-1).tolist()
    return out


def format_head_markdown(report: EvalReport, run_name: str) -> str:
    """eval.md of a classification head: tuned vs majority class, per-class scores, confusion matrix."""
    lines = [f"# Evaluation of `{run_name}`", "", f"Data: `{report.data}` ({report.rows} rows).", "", report.note, ""]
    lines += markdown_table(["metric", *(["majority class"] if report.baseline else []), "fine-tuned"], _rows(report))
    lines += ["", f"Labels: {', '.join(f'`{label}`' for label in report.labels)}."]
    if report.tuned.classification:
        lines += ["", "## Fine-tuned: per class", ""] + per_class_lines(report.tuned.classification)
        lines += ["", "## Fine-tuned: confusion matrix (rows: reference, columns: predicted)", ""]
        lines += confusion_lines(report.tuned.classification)
    if "loss_curve" in report.files:
        lines += ["", "## Training loss", "", "![train and eval loss against step](loss.png)"]
    if report.examples:
        lines += ["", "## Examples", ""]
        rows = [[table_cell(e[k]) for k in ("input", "reference", "tuned")] for e in report.examples]
        lines += markdown_table(["input", "reference", "predicted"], rows)
    return "\n".join(lines) + "\n"


def headline_rows(report: EvalReport) -> list[tuple[str, str, str]]:
    """(metric, majority class, fine-tuned) as display strings."""
    rows = [
        ("accuracy", lambda s: percent(class_score(s, "accuracy"))),
        ("macro precision", lambda s: number(class_score(s, "macro_precision"))),
        ("macro recall", lambda s: number(class_score(s, "macro_recall"))),
        ("macro F1", lambda s: number(class_score(s, "macro_f1"))),
    ]
    return [(name, get(report.baseline) if report.baseline else "", get(report.tuned)) for name, get in rows]


def _rows(report: EvalReport) -> list[list[str]]:
    return [[name, *([base] if report.baseline else []), tuned] for name, base, tuned in headline_rows(report)]


def format_console(report: EvalReport, run_dir: str) -> str:
    lines = [f"Held-out evaluation of the classification head on {report.data} ({report.rows} rows):"]
    first = "majority class" if report.baseline else ""
    lines.append(f"  {'':15}  {first:>14}  {'fine-tuned':>10}")
    lines += [f"  {name:15}  {base:>14}  {tuned:>10}" for name, base, tuned in headline_rows(report)]
    lines.append("  (the base model is not scored: its classification head is untrained)")
    lines.append(f"Report written to {Path(run_dir) / EVAL_MARKDOWN} and {EVAL_JSON}")
    return "\n".join(lines)
