"""A vision run's evaluation: base and base + adapter answer the held-out rows, each with its images.

Each row's prompt is its conversation up to the last answer; the reference is that answer. Scores are exact match,
normalised exact match and, for label-style answers (a colour, a class), accuracy and per-class scores; the examples
name the images beside the answers.
"""

from __future__ import annotations

from lora_tune.data.sources import read_source
from lora_tune.data.vision import vision_row
from lora_tune.evaluate.report import format_markdown
from lora_tune.evaluate.result import EvalReport, Score
from lora_tune.evaluate.run import Evaluation, write_report
from lora_tune.evaluate.scores import (
    classification_scores,
    exact_match,
    infer_labels,
    map_to_label,
    normalized_exact_match,
)
from lora_tune.inference.vision import answer, load_vision_run
from lora_tune.recipe.schema import DatasetConfig

TASK = "vision"


def evaluate_vision(
    evaluation: Evaluation, *, base: bool = True, limit: int | None = None, progress: bool = True
) -> EvalReport:
    """Answers and scores of base + adapter (and, with `base`, of the base alone); writes eval.json and eval.md."""
    source = DatasetConfig(path=str(evaluation.path), limit=limit)
    vision = evaluation.recipe.vision
    assert vision is not None
    rows = [
        vision_row(row, origin, evaluation.path.parent, max_images=vision.max_images)
        for origin, row in read_source(source).rows
    ]
    prompts, references, images = [], [], []
    for row in rows:
        last = max(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
        prompts.append(row.messages[:last])
        references.append("".join(p.get("text", "") for p in row.messages[last]["content"]).strip())
        shown = sum(p["type"] == "image" for m in row.messages[:last] for p in m["content"])
        images.append(row.images[:shown])
    settings = evaluation.settings
    labels = list(settings.labels) or (None if settings.task == "text" else infer_labels(references))
    model, processor, _ = load_vision_run(evaluation.run.root)

    def score() -> tuple[Score, list[str]]:
        said = [answer(model, processor, p, i, settings) for p, i in zip(prompts, images, strict=True)]
        result = Score(
            exact_match=exact_match(said, references),
            normalized_exact_match=normalized_exact_match(said, references),
            classification=(
                classification_scores(
                    [map_to_label(a, labels) for a in said], [map_to_label(r, labels) for r in references], labels
                ).to_json()
                if labels
                else None
            ),
        )
        return result, said

    tuned, tuned_answers = score()
    report = EvalReport(
        data=str(evaluation.path),
        rows=len(rows),
        tuned=tuned,
        task="labels" if labels else "text",
        labels=labels or [],
        settings=settings.model_dump(),
    )
    base_answers = None
    if base:
        with model.disable_adapter():
            report.base, base_answers = score()
    report.examples = [
        {
            "input": f"{_names(row)}: {_text(prompt)}",
            "reference": ref,
            **({"base": base_answers[k]} if base_answers else {}),
            "tuned": tuned_answers[k],
        }
        for k, (row, prompt, ref) in enumerate(zip(rows, prompts, references, strict=True))
    ][: settings.examples]
    write_report(evaluation.run, report, format_markdown)
    return report


def _names(row) -> str:  # noqa: ANN001 - a VisionRow
    from pathlib import Path

    return ", ".join(Path(c["path"]).name if c.get("path") else "embedded image" for c in row.images)


def _text(messages: list) -> str:
    return " ".join(p.get("text", "") for m in messages if m["role"] == "user" for p in m["content"]).strip()
