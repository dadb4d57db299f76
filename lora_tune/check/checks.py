"""The pre-flight checks: run on the recipe's own data with its tokenizer, before any model weight is loaded."""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.check.examples import ExampleFacts, inspect_row, mark_trained, sample_rows
from lora_tune.check.report import CheckResult, MarkedExample, PreflightError, PreflightReport
from lora_tune.check.rules import PER_EXAMPLE_CHECKS, TEMPLATE_FIX, Context
from lora_tune.data.masking import TemplateError
from lora_tune.model.stops import read_generation_stops
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import write_json_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def run_checks(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreflightReport:
    """Check a sample of the recipe's training rows (`preflight.sample_rows` per dataset) with `tokenizer`.

    `tokenizer` is the one training uses (`modeling.load_tokenizer`, with `model.chat_template` applied). Reads the
    model's generation config (generation_config.json, else config.json), never its weights.
    """
    skip_bad = recipe.data.on_bad_rows == "skip"
    rows, sources = sample_rows(recipe.datasets, recipe.preflight.sample_rows, recipe.training.seed, skip_bad=skip_bad)
    max_length = recipe.training.max_length
    facts: list[ExampleFacts] = []
    refused: list[tuple[str, int, str]] = []
    for row in rows:
        try:
            facts.extend(inspect_row(row, tokenizer, max_length, recipe.data.thinking))
        except TemplateError as e:
            refused.append((row.file, row.row, str(e)))
    generation_stops, source = read_generation_stops(recipe.model)
    ctx = Context(recipe, tokenizer, facts, _special_ids(tokenizer), generation_stops, source)
    template = chat_template_text(tokenizer)

    checks = [_template_renders(refused, len(rows))]
    checks += [check(ctx) for check in PER_EXAMPLE_CHECKS]
    checks.append(_template_saved(template, tokenizer, recipe.model.trust_remote_code))

    kept = [f.example for f in facts if f.example.num_trained]
    closing = sorted({f.full.input_ids[end - 1] for f in facts for _, end in f.turns} & ctx.closers())
    return PreflightReport(
        checks=checks,
        rows=len(rows),
        sources=sources,
        tokens=sum(len(e.input_ids) for e in kept),
        trained_tokens=sum(e.num_trained for e in kept),
        stop_tokens=[ctx.tokenizer.convert_ids_to_tokens(i) for i in closing],
        generation_stop_tokens=None if generation_stops is None else [ctx.name(i) for i in generation_stops],
        generation_config=source,
        chat_template_sha256=sha256(template),
        example=_example(ctx, checks),
        max_length=max_length,
        longest_example=max((len(f.full.input_ids) for f in facts), default=0),
    )


def preflight(
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    report_path: Path,
    checks: Callable[[Recipe, PreTrainedTokenizerBase], PreflightReport] = run_checks,
) -> PreflightReport:
    """`train`'s pre-flight step: run the task's `checks`, write the JSON report to `report_path`, log warnings and
    the one-line summary; raise `PreflightError` on a failed check unless the recipe sets `preflight.on_failure:
    warn`."""
    report = checks(recipe, tokenizer)
    write_json_atomic(report_path, report.to_json())
    if report.failures and recipe.preflight.on_failure == "error":
        raise PreflightError(report, str(report_path))
    for check in report.failures:
        log.warning("pre-flight FAILED (training anyway: preflight.on_failure is warn): %s", check.line())
    for check in report.warnings:
        log.warning("pre-flight warning: %s", check.line())
    log.info("%s", report.summary())
    return report


def chat_template_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template `apply_chat_template` uses (the default one when the tokenizer has several)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = tokenizer.get_chat_template()
    return template or ""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def _template_renders(refused: list[tuple[str, int, str]], total: int) -> CheckResult:
    if not refused:
        return CheckResult("template", "pass", f"the chat template renders all {total} rows; assistant turns located")
    file, row, reason = refused[0]
    fix = f"{TEMPLATE_FIX} renders these conversations, each turn the same whatever follows"
    return CheckResult("template", "fail", reason, fix, count=len(refused), file=file, row=row)


def _template_saved(template: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool) -> CheckResult:
    """Save the tokenizer as `train` saves it beside the adapter, load it back as inference will: same template?"""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="lora-tune-preflight-") as tmp:
        tokenizer.save_pretrained(tmp)
        reloaded = chat_template_text(AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code))
    if reloaded == template:
        return CheckResult(
            "chat-template-saved", "pass", "the tokenizer saved with the adapter reloads the same template"
        )
    at = next(
        (i for i, (a, b) in enumerate(zip(template, reloaded, strict=False)) if a != b),
        min(len(template), len(reloaded)),
    )
    fix = f"{TEMPLATE_FIX} uses \\n line endings only" if "\r" in template else f"{TEMPLATE_FIX} survives saving"
    return CheckResult(
        "chat-template-saved",
        "fail",
        f"the template saved with the adapter reloads differently (sha256 {sha256(template)[:12]} in training, "
        f"{sha256(reloaded)[:12]} after saving; from character {at}: {template[at : at + 12]!r} became "
        f"{reloaded[at : at + 12]!r}), so inference would render prompts unlike the training examples; "
        "expected a byte-identical template",
        fix,
    )


def _example(ctx: Context, checks: list[CheckResult]) -> MarkedExample | None:
    """The first row of the first failed (else warned) check that names one, else the first row checked."""
    by_row = {(f.source.file, f.source.row): f for f in ctx.facts}
    for status in ("fail", "warn"):
        for check in checks:
            if check.status == status and (check.file, check.row) in by_row:
                return _marked(by_row[(check.file, check.row)], ctx.tokenizer)
    return _marked(ctx.facts[0], ctx.tokenizer) if ctx.facts else None


def _marked(facts: ExampleFacts, tokenizer: PreTrainedTokenizerBase) -> MarkedExample:
    text = mark_trained(facts.example, tokenizer)
    return MarkedExample(facts.source.file, facts.source.row, text, facts.example.truncated)
