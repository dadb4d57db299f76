"""The evaluation report as readable Markdown: headline scores side by side, per-class scores, confusion
matrices, the loss curve and example generations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_tune.evaluate.result import EvalReport, Score


def headline_rows(report: EvalReport) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) as display strings; base is '' when the base was not evaluated."""
    rows = [
        ("exact match", lambda s: percent(s.exact_match)),
        ("normalised exact match", lambda s: percent(s.normalized_exact_match)),
        ("reference perplexity", lambda s: number(s.perplexity)),
    ]
    if report.task == "labels":
        rows += [
            ("accuracy (labels)", lambda s: percent(class_score(s, "accuracy"))),
            ("macro precision", lambda s: number(class_score(s, "macro_precision"))),
            ("macro recall", lambda s: number(class_score(s, "macro_recall"))),
            ("macro F1", lambda s: number(class_score(s, "macro_f1"))),
        ]
    return [(name, get(report.base) if report.base else "", get(report.tuned)) for name, get in rows]


def format_markdown(report: EvalReport, run_name: str) -> str:
    """eval.md of a run that generates answers (a classification head's: eval_head.format_head_markdown)."""
    lines = [f"# Evaluation of `{run_name}`", ""]
    lines += [f"Data: `{report.data}` ({report.rows} rows). " + _settings_line(report.settings), ""]
    lines += markdown_table(["metric", *(["base"] if report.base else []), "fine-tuned"], _headline(report))
    lines += ["", f"Perplexity is over the {report.scored_tokens} reference tokens (assistant answers with their "]
    lines[-1] += "end-of-turn token, as training scores them)."
    if report.task == "labels":
        lines += ["", f"Labels: {', '.join(f'`{label}`' for label in report.labels)}. Answers that name no single "]
        lines[-1] += "label count as `(other)`."
        for title, score in (("Fine-tuned", report.tuned), ("Base", report.base)):
            if score is not None and score.classification:
                lines += ["", f"## {title}: per class", ""] + per_class_lines(score.classification)
                lines += ["", f"## {title}: confusion matrix (rows: reference, columns: answer)", ""]
                lines += confusion_lines(score.classification)
    if "loss_curve" in report.files:
        lines += ["", "## Training loss", "", "![train and eval loss against step](loss.png)"]
    if report.examples:
        lines += ["", "## Examples", ""]
        headers = ["input", "reference", *(["base"] if report.base else []), "fine-tuned"]
        keys = ["input", "reference", *(["base"] if report.base else []), "tuned"]
        lines += markdown_table(headers, [[table_cell(e.get(k, "")) for k in keys] for e in report.examples])
    return "\n".join(lines) + "\n"


def _headline(report: EvalReport) -> list[list[str]]:
    return [[name, *([base] if report.base else []), tuned] for name, base, tuned in headline_rows(report)]


def _settings_line(settings: dict[str, Any]) -> str:
    if not settings:
        return ""
    how = (
        "greedy"
        if not settings.get("do_sample")
        else f"sampling (T={settings['temperature']}, top_p={settings['top_p']})"
    )
    return f"Generation: {how}, up to {settings.get('max_new_tokens')} new tokens."


def per_class_lines(classification: dict[str, Any]) -> list[str]:
    rows = [
        [f"`{label}`", number(c["precision"]), number(c["recall"]), number(c["f1"]), str(c["support"])]
        for label, c in classification["per_class"].items()
    ]
    return markdown_table(["label", "precision", "recall", "F1", "support"], rows)


def confusion_lines(classification: dict[str, Any]) -> list[str]:
    confusion = classification["confusion"]
    rows = [
        [f"`{t}`", *map(str, counts)] for t, counts in zip(confusion["rows_true"], confusion["counts"], strict=True)
    ]
    return markdown_table(["", *(f"`{c}`" for c in confusion["columns_predicted"])], rows)


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def table_cell(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)  # control characters made visible
    return text if len(text) <= limit else text[: limit - 1] + "…"


def class_score(score: Score, key: str) -> float | None:
    return score.classification.get(key) if score.classification else None


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}" if value < 1e4 else f"{value:.3g}"
