"""SFT's evaluation: the base model and base + adapter, loaded as in training, on held-out chat data.

Both models answer every prompt with the recipe's `eval:` generation settings (batched, left-padded), and score the
references' tokens for perplexity. The report (`eval.json`, `eval.md`) shows them side by side, with exact match,
normalised exact match, classification metrics for label-style tasks, the loss curve and a few examples.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

from lora_tune.data import load_rows, normalize_rows
from lora_tune.evaluate.report import format_markdown, headline_rows
from lora_tune.evaluate.result import EvalReport, Score
from lora_tune.evaluate.run import EvalDataError, Evaluation, write_report
from lora_tune.evaluate.scores import (
    OTHER,
    answer_part,
    classification_scores,
    exact_match,
    infer_labels,
    map_to_label,
    normalized_exact_match,
    perplexity_from_nll,
    reference_nll,
)
from lora_tune.inference.answers import generate_answers, prompt_messages, reference_answer
from lora_tune.inference.load import load_base_model, load_run_model
from lora_tune.recipe.schema import DatasetConfig
from lora_tune.run.layout import EVAL_JSON, EVAL_MARKDOWN


def evaluate_generations(
    evaluation: Evaluation, *, base: bool = True, limit: int | None = None, progress: bool = True
) -> EvalReport:
    """Answers and scores of base + adapter (and, with `base`, of the base alone); writes eval.json and eval.md."""
    run, recipe, settings, path = evaluation.run, evaluation.recipe, evaluation.settings, evaluation.path
    source = DatasetConfig(path=str(path), limit=limit)
    conversations = normalize_rows(load_rows(source), source)
    references = [reference_answer(c) for c in conversations]
    labels = _label_set(settings, [answer_part(r) for r in references])

    model, tokenizer = load_run_model(run)

    def score() -> tuple[Score, list[str], int]:
        return _score_model(model, tokenizer, conversations, references, labels, settings, recipe, progress)

    tuned, tuned_answers, tokens = score()
    report = EvalReport(
        data=str(path),
        rows=len(conversations),
        tuned=tuned,
        task="labels" if labels else "text",
        labels=labels or [],
        settings=settings.model_dump(),
        scored_tokens=tokens,
    )
    base_answers: list[str] | None = None
    if base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            report.base, base_answers, _ = score()
    elif base:  # partial or full fine-tuning: the tuned weights are the model's own, so load the base anew
        del model
        gc.collect()
        model = load_base_model(recipe)
        report.base, base_answers, _ = score()
    report.examples = _examples(conversations, references, tuned_answers, base_answers, settings.examples)
    write_report(run, report, format_markdown)
    return report


def _label_set(settings: Any, references: list[str]) -> list[str] | None:
    if settings.task == "text":
        return None
    if settings.labels:
        return list(settings.labels)
    labels = infer_labels(references)
    if labels is None and settings.task == "labels":
        raise EvalDataError(
            "eval.task is 'labels' but the references do not look like a label set (2-20 distinct answers); "
            "list them in eval.labels"
        )
    return labels


def _score_model(
    model: Any,
    tokenizer: Any,
    conversations: list[Any],
    references: list[str],
    labels: list[str] | None,
    settings: Any,
    recipe: Any,
    progress: bool,
) -> tuple[Score, list[str], int]:
    answers = generate_answers(model, tokenizer, conversations, settings=settings, progress=progress)
    nll, tokens = reference_nll(
        model, tokenizer, conversations, batch_size=settings.batch_size, max_length=recipe.training.max_length
    )
    # A reasoning model's reply is scored on its answer, after the thinking (as the reference's is).
    said, expected = [answer_part(a) for a in answers], [answer_part(r) for r in references]
    score = Score(
        exact_match=exact_match(said, expected),
        normalized_exact_match=normalized_exact_match(said, expected),
        perplexity=perplexity_from_nll(nll, tokens),
        classification=_classification(said, expected, labels),
    )
    return score, answers, tokens


def _classification(answers: list[str], references: list[str], labels: list[str] | None) -> dict[str, Any] | None:
    if not labels:
        return None
    true = [map_to_label(r, labels) for r in references]
    if OTHER in true:
        row = true.index(OTHER) + 1
        raise EvalDataError(f"row {row}: reference {references[row - 1]!r} is none of the labels {labels}")
    return classification_scores([map_to_label(a, labels) for a in answers], true, labels).to_json()


def _examples(
    conversations: list[Any], references: list[str], tuned: list[str], base: list[str] | None, n: int
) -> list[dict[str, str]]:
    rows = []
    for i in range(min(n, len(conversations))):
        row = {"input": prompt_messages(conversations[i])[-1]["content"], "reference": references[i]}
        if base is not None:
            row["base"] = base[i]
        row["tuned"] = tuned[i]
        rows.append(row)
    return rows


def format_report(report: EvalReport, run_dir: str) -> str:
    """The console summary: the headline scores, base vs fine-tuned, and where the full report is."""
    lines = [f"Held-out evaluation on {report.data} ({report.rows} rows):"]
    width = max(len(name) for name, _, _ in headline_rows(report))
    header = (
        f"  {'':{width}}  {'base':>9}  {'fine-tuned':>10}" if report.base else f"  {'':{width}}  {'fine-tuned':>10}"
    )
    lines.append(header)
    for name, base, tuned in headline_rows(report):
        lines.append(f"  {name:{width}}  {base:>9}  {tuned:>10}" if report.base else f"  {name:{width}}  {tuned:>10}")
    for example in report.examples[:3]:
        lines.append(f"    e.g. {example['input']!r} -> {example['tuned']!r} (expected {example['reference']!r})")
    lines.append(f"Report written to {Path(run_dir) / EVAL_MARKDOWN} and {EVAL_JSON}")
    return "\n".join(lines)
