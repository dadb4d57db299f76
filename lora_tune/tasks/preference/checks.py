"""The pre-flight check of a preference run (dpo, orpo, kto, simpo): the pairs as TRL will tokenize them.

Every row is read and checked on load (tasks/preference/data.py: pairs that prefer nothing, answers after different
prompts, empty answers fail there with their file and line; a row over the memory bound stops the check at once,
before anything tokenizes it), and a KTO set needs both labels among its training rows (`one-class`). Here each pair
is rendered with the run's chat template, as the trainers render it: the prompt once with the generation prompt,
each answer as the assistant turn of the whole conversation. The checks: both answers are closed by the end-of-turn
token the model must learn to stop at (a template may write a newline after it); no pair becomes identical when
max_length cuts it; how many prompts and pairs max_length truncates.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lora_tune.check.report import CheckResult, PreflightReport
from lora_tune.data.sources import Origin
from lora_tune.errors import DataError
from lora_tune.model.stops import config_stops, read_generation_stops
from lora_tune.recipe.rules import OBJECTIVES
from lora_tune.recipe.schema import Recipe
from lora_tune.tasks.preference.data import (
    load_preference_splits,
    one_class,
    preference_rows_with_origins,
    tokenize_pair,
)


def preference_report(recipe: Recipe, tokenizer: Any) -> PreflightReport:
    """`lora-tune check` (and train's pre-flight step) for a preference recipe."""
    kto = OBJECTIVES[recipe.training.objective].rows == "kto"
    refused: list[tuple[Origin, DataError]] = []
    training = [pair for s in recipe.datasets for pair in preference_rows_with_origins(s, kto=kto, refused=refused)]
    held = [pair for s in recipe.eval_datasets for pair in preference_rows_with_origins(s, kto=kto, refused=refused)]
    located = training + held
    origins, rows = [o for o, _ in located], [r for _, r in located]
    per_file = Counter(o.file for o in origins)
    kinds = [_kinds(training)] if kto else []
    # The split refuses what the checks report (a row, one label): count its rows only when it will not.
    splits = not refused and all(check.status == "pass" for check in kinds)
    train_rows = len(load_preference_splits(recipe).train) if splits else len(rows)
    limit = recipe.training.max_length
    rendered = [tokenize_pair(tokenizer, row) for row in rows]
    generation_stops, source = read_generation_stops(recipe.model)
    stop_ids = set(config_stops(tokenizer, generation_stops))  # what generation stops on, as the SFT checks read it
    unclosed = [i for i, (_, answers) in enumerate(rendered) if any(not stop_ids & set(a) for a in answers)]
    too_long = [
        i for i, (p, answers) in enumerate(rendered) if limit and any(len(p) + len(a) > limit for a in answers)
    ]
    prompt_only = [i for i, (p, _) in enumerate(rendered) if limit and len(p) >= limit]
    identical = [i for i, (p, a) in enumerate(rendered) if limit and len(a) == 2 and _same_when_cut(p, a, limit)]
    checks = _refusals(refused, len(origins) + len(refused)) + kinds + [
        _check("stop", unclosed, origins, _unclosed(tokenizer, stop_ids, source),
               "use a chat template that closes the assistant turn (model.chat_template)"),
        _check("truncated-identical", identical, origins, "pairs become identical once max_length cuts them",
               "raise training.max_length"),
        _check("truncation", too_long, origins, f"rows are longer than max_length {limit} and are cut",
               "raise training.max_length", status="warn"),
        _check("prompt-too-long", prompt_only, origins, f"prompts alone fill max_length {limit}; TRL drops them",
               "raise training.max_length", status="warn"),
    ]  # fmt: skip
    lengths = [len(p) + max(map(len, a)) for p, a in rendered]
    return PreflightReport(
        checks=checks,
        rows=train_rows,
        sources={d.path: {"rows": per_file[d.path], "checked": per_file[d.path]} for d in recipe.datasets},
        tokens=sum(lengths),
        trained_tokens=sum(sum(map(len, a)) for _, a in rendered),
        stop_tokens=tokenizer.convert_ids_to_tokens(sorted(stop_ids)),
        generation_stop_tokens=tokenizer.convert_ids_to_tokens(generation_stops) if generation_stops else None,
        generation_config=source,
        chat_template_sha256="",
        max_length=limit,
        longest_example=max(lengths, default=0),
    )


def _unclosed(tokenizer: Any, stop_ids: set[int], source: str) -> str:
    """Why answers count as unclosed: no stop token among their tokens, or none to stop on at all."""
    if not stop_ids:
        return f"nothing stops generation: {source} lists no eos token id; the model would not learn to stop"
    tokens = ", ".join(tokenizer.convert_ids_to_tokens(sorted(stop_ids)))
    return f"answers are not closed by the end-of-turn token ({tokens}); the model would not learn to stop"


def _kinds(training: list[tuple[Origin, dict[str, Any]]]) -> CheckResult:
    """`one-class`: KTO's training rows carry both labels; a failure names the first row."""
    found = one_class([row for _, row in training]) if training else None
    if found is None:
        desirable = sum(row["label"] for _, row in training)
        both = f"{desirable:,} desirable and {len(training) - desirable:,} undesirable training rows"
        return CheckResult("one-class", "pass", both)
    (why, fix), first = found, training[0][0]
    return CheckResult("one-class", "fail", why, fix=fix, count=len(training), file=first.file, row=first.number)


def _same_when_cut(prompt: list[int], answers: list[list[int]], limit: int) -> bool:
    room = max(0, limit - len(prompt))
    return answers[0][:room] == answers[1][:room]


ROW_FAULTS = (  # (check name, what the data error says)
    ("prefers-nothing", "chosen equals rejected"),
    ("prompt-mismatch", "different prompts"),
    ("empty-answer", "is empty"),
)


def _refusals(refused: list[tuple[Origin, DataError]], total: int) -> list[CheckResult]:
    """One failed check per kind of row that cannot teach a preference, with its count and its first row."""
    kinds = [name for name, _ in ROW_FAULTS] + ["bad-row"]
    by_kind: dict[str, list[tuple[Origin, DataError]]] = {kind: [] for kind in kinds}
    for origin, error in refused:
        kind = next((name for name, says in ROW_FAULTS if says in error.message), "bad-row")
        by_kind[kind].append((origin, error))
    results = []
    for kind, found in by_kind.items():
        if found:
            first, error = found[0]
            results.append(
                CheckResult(kind, "fail", f"{len(found)} of {total} rows: {error.message}", count=len(found),
                            file=first.file, row=first.number, fix="fix or drop these rows")
            )  # fmt: skip
    return results


def _check(
    name: str, rows: list[int], origins: list[Origin], what: str, fix: str, status: str = "fail"
) -> CheckResult:
    """The check's result; a finding names its first row by file and line, as the SFT checks do."""
    total = len(origins)
    if not rows:
        return CheckResult(name, "pass", f"0 of {total} rows: {what}")
    first = origins[rows[0]]
    return CheckResult(
        name, status, f"{len(rows)} of {total} {what}", fix=fix, count=len(rows), file=first.file, row=first.number
    )  # type: ignore[arg-type]
