"""What an evaluation found: the scores of one model and the report of a run (eval.json is this, as JSON).

Plain data, imported by the evaluation (`eval_run`), its Markdown and console renderers (`eval_report`) and the
classification head's evaluation (`eval_head`), so that none of them has to import another for its types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Score:
    exact_match: float
    normalized_exact_match: float
    perplexity: float | None = None  # of the reference answers' tokens (assistant-only, end-of-turn included)
    classification: dict[str, Any] | None = None  # accuracy, precision/recall/F1, confusion (label-style tasks)
    preference: dict[str, Any] | None = None  # preference runs: accuracies, reward margin, log-probabilities
    rl: dict[str, Any] | None = None  # online RL runs: each reward's mean, the weighted total, the pass rate


@dataclass
class EvalReport:
    data: str
    rows: int
    tuned: Score
    base: Score | None = None
    task: str = "text"  # "labels" when classification metrics were computed; "head", "preference", "rl"
    labels: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    scored_tokens: int = 0
    # A few rows: input, reference, tuned (and base) output.
    examples: list[dict[str, str]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    # A classification head (task "head"): the majority-class baseline, and what the report compares.
    baseline: Score | None = None
    note: str = ""
