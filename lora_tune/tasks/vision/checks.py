"""A vision run's pre-flight (`lora-tune check`, and `train` before the model loads) and its `lora-tune data` view.

Every row is read and each image opened (a missing, unreadable or oversized image, or a placeholder count that does
not match the images, stops with one line naming file, row and image); then each row goes through the collator the
trainer uses, so what is checked is what trains: image tokens per row, rows cut by max_length (an image cut in two
is refused), the assistant turns trained and no image token, the end-of-turn token trained in every answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_tune.check import CheckResult, MarkedExample, PreflightReport, chat_template_text, sha256
from lora_tune.data.masking import IGNORE_INDEX, TemplateError
from lora_tune.data.vision import VisionCollator, VisionRow, open_image
from lora_tune.model.vision import load_processor
from lora_tune.recipe.schema import Recipe
from lora_tune.tasks.vision.data import load_vision_splits


@dataclass
class RowView:
    """One training row as the model sees it."""

    row: VisionRow
    sizes: list[tuple[int, int]]
    tokens: int
    image_tokens: int
    trained: int
    truncated: bool
    ends_with_stop: bool
    marked: str


def row_views(recipe: Recipe, processor: Any, rows: list[VisionRow]) -> list[RowView]:
    """Each row through the trainer's collator, one at a time (an image cut by max_length names its row)."""
    assert recipe.vision is not None
    collator = VisionCollator(processor, recipe.training.max_length, recipe.vision.max_image_side)
    tokenizer = processor.tokenizer
    stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(tokenizer.eos_token)}
    views = []
    for row in rows:
        try:
            batch = collator.collate([row.to_json()])
        except TemplateError as e:
            raise row.origin.error(str(e), "messages") from None
        ids = batch.inputs["input_ids"][0].tolist()
        labels = batch.inputs["labels"][0].tolist()
        trained = [label != IGNORE_INDEX for label in labels]
        ends = [k for k in range(len(ids)) if trained[k] and (k + 1 == len(ids) or not trained[k + 1])]
        views.append(
            RowView(
                row,
                [open_image(cell).size for cell in row.images],
                len(ids),
                batch.image_tokens[0],
                sum(trained),
                batch.truncated[0],
                bool(ends) and all(ids[k] in stops for k in ends),
                _marked(tokenizer, ids, trained),
            )
        )
    return views


def vision_checks(recipe: Recipe, processor: Any) -> PreflightReport:
    splits = load_vision_splits(recipe)
    views = row_views(recipe, processor, splits.train)
    tokenizer = processor.tokenizer
    checks = [
        CheckResult("images", "pass", f"{sum(len(v.row.images) for v in views)} images in {len(views)} rows opened"),
        _first_failing("assistant-mask", views, lambda v: v.trained > 0, "no assistant token left to train"),
        _first_failing(
            "end-of-turn",
            views,
            lambda v: v.ends_with_stop,
            f"an answer does not end with {tokenizer.eos_token} trained",
        ),
        _first_failing(
            "truncation", views, lambda v: not v.truncated, "text after the images is cut by max_length", status="warn"
        ),
    ]
    first = views[0]
    return PreflightReport(
        checks=checks,
        rows=len(views),
        sources={s.path: {"rows": len(splits.train), "checked": len(views)} for s in recipe.datasets},
        tokens=sum(v.tokens for v in views),
        trained_tokens=sum(v.trained for v in views),
        stop_tokens=[tokenizer.eos_token],
        generation_stop_tokens=None,
        generation_config="not read for a vision run",
        chat_template_sha256=sha256(chat_template_text(tokenizer)),
        example=MarkedExample(first.row.origin.file, first.row.origin.number, first.marked, first.truncated),
        max_length=recipe.training.max_length,
        longest_example=max(v.tokens for v in views),
    )


def format_vision_preview(recipe: Recipe, tokenizer: Any, *, n: int, color: bool) -> str:
    """`lora-tune data` for a vision run: per row its images and sizes, its tokens, image tokens, trained tokens."""
    processor = load_processor(recipe.model)
    splits = load_vision_splits(recipe)
    views = row_views(recipe, processor, splits.train)
    cut = sum(v.truncated for v in views)
    lines = [
        f"{len(views)} training rows, {len(splits.validation)} validation, {len(splits.test)} test; "
        f"{sum(len(v.row.images) for v in views)} images; image tokens per row "
        f"{min(v.image_tokens for v in views)}-{max(v.image_tokens for v in views)}; rows cut by max_length "
        f"{recipe.training.max_length}: {cut} (after their images; an image cut is refused)",
        "",
    ]
    for v in views[:n]:
        sizes = ", ".join(f"{w}x{h}" for w, h in v.sizes)
        names = ", ".join(str(c.get("path") or "embedded") for c in v.row.images)
        lines.append(
            f"{v.row.origin.file} row {v.row.origin.number}: {len(v.row.images)} image(s) {sizes} [{names}]; "
            f"{v.tokens} tokens, {v.image_tokens} image tokens, {v.trained} trained"
        )
        lines += ["  " + line for line in v.marked.splitlines()] + [""]
    return "\n".join(lines)


def _first_failing(name: str, views: list[RowView], ok: Any, message: str, status: str = "fail") -> CheckResult:
    bad = [v for v in views if not ok(v)]
    if not bad:
        return CheckResult(name, "pass", f"every row of {len(views)}")
    origin = bad[0].row.origin
    return CheckResult(name, status, message, count=len(bad), file=origin.file, row=origin.number)  # type: ignore[arg-type]


def _marked(tokenizer: Any, ids: list[int], trained: list[bool]) -> str:
    """The row's text with trained tokens in [[...]] and each run of image tokens shown once as <image xN>."""
    out, k = [], 0
    while k < len(ids):
        j = k
        while j < len(ids) and trained[j] == trained[k]:
            j += 1
        text = tokenizer.decode(ids[k:j], skip_special_tokens=False)
        out.append(f"[[{text}]]" if trained[k] else text)
        k = j
    return _squeeze_images("".join(out))


def _squeeze_images(text: str) -> str:
    import re

    return re.sub(r"(<image>)(?:\1)+", lambda m: f"<image x{len(m.group(0)) // len('<image>')}>", text)
