"""Evaluating a preference run (dpo, orpo, kto, simpo) on held-out pairs, base vs tuned.

For each pair both models score the chosen and the rejected answer (log-probability of the answer's tokens, the
end-of-turn marker included, given the prompt rendered with the run's chat template, as the trainers render it):
- preference accuracy, per model: the share of pairs whose chosen answer has the higher mean log-probability per
  token (length-normalised, so a short answer is not preferred for its length alone);
- reward accuracy and margin, of the tuned model against the base as reference (DPO's implicit reward
  beta * log(pi / pi_ref)): the share of pairs whose chosen answer gains more than the rejected one, and the mean
  gap; what `eval_rewards/accuracies` measures during training;
- greedy answers of both models to the first prompts, side by side with the chosen answer.
KTO runs are scored on pairs as well (`--data` with prompt/chosen/rejected rows); their own held-out rows carry one
answer each, which says nothing about a preference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_tune.evaluate.report import markdown_table, number, percent, table_cell
from lora_tune.evaluate.result import EvalReport, Score
from lora_tune.evaluate.run import EvalDataError, Evaluation, write_report
from lora_tune.inference.answers import generate_answers
from lora_tune.inference.load import load_run_model
from lora_tune.recipe.schema import DatasetConfig
from lora_tune.run.layout import EVAL_JSON, EVAL_MARKDOWN
from lora_tune.tasks.preference.data import read_preference_rows, split_completion
from lora_tune.training.trl_args import DEFAULT_BETA

TASK = "preference"


@dataclass(frozen=True)
class PairScores:
    """Summed log-probabilities of each pair's chosen and rejected answers, and their token counts."""

    chosen: list[float]
    rejected: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]

    def accuracy(self) -> float:
        wins = [
            c / max(nc, 1) > r / max(nr, 1)
            for c, r, nc, nr in zip(self.chosen, self.rejected, self.chosen_tokens, self.rejected_tokens, strict=True)
        ]
        return sum(wins) / len(wins)


def evaluate_preference(
    evaluation: Evaluation, *, base: bool = True, limit: int | None = None, progress: bool = True
) -> EvalReport:
    """Base vs tuned on the held-out pairs; writes eval.json and eval.md into the run directory."""
    ev = evaluation
    try:
        pairs = read_preference_rows(DatasetConfig(path=str(ev.path), limit=limit), kto=False)
    except Exception as exc:
        raise EvalDataError(f"{ev.path}: a preference run is scored on prompt/chosen/rejected rows: {exc}") from None
    model, tokenizer = load_run_model(ev.run)
    beta = ev.recipe.preference.beta or DEFAULT_BETA[ev.recipe.training.objective]
    tuned = pair_scores(model, tokenizer, pairs)
    conversations = [p["prompt"] + p["chosen"] for p in pairs[: ev.settings.examples]]
    tuned_answers = generate_answers(model, tokenizer, conversations, settings=ev.settings, progress=progress)
    with model.disable_adapter():
        reference = pair_scores(model, tokenizer, pairs)
        base_answers = generate_answers(model, tokenizer, conversations, settings=ev.settings, progress=progress)
    margins = [
        beta * ((tc - bc) - (tr - br))
        for tc, tr, bc, br in zip(tuned.chosen, tuned.rejected, reference.chosen, reference.rejected, strict=True)
    ]
    report = EvalReport(
        data=str(ev.path),
        rows=len(pairs),
        tuned=_score(tuned, reward_accuracy=sum(m > 0 for m in margins) / len(margins), margin=_mean(margins)),
        base=_score(reference) if base else None,
        task=TASK,
        settings={"beta": beta, "objective": ev.recipe.training.objective},
        examples=[
            {"input": p["prompt"][-1]["content"], "reference": p["chosen"][0]["content"], "base": b, "tuned": t}
            for p, b, t in zip(pairs, base_answers, tuned_answers, strict=False)
        ],
    )
    write_report(ev.run, report, format_preference_markdown)
    return report


def pair_scores(model: Any, tokenizer: Any, pairs: list[dict[str, Any]]) -> PairScores:
    chosen = [answer_logprob(model, tokenizer, p["prompt"], p["chosen"]) for p in pairs]
    rejected = [answer_logprob(model, tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    return PairScores(
        [c for c, _ in chosen], [r for r, _ in rejected], [n for _, n in chosen], [n for _, n in rejected]
    )


def answer_logprob(model: Any, tokenizer: Any, prompt: list[dict], answer: list[dict]) -> tuple[float, int]:
    """(summed log-probability of the answer's tokens given the prompt, their count), tokenized as TRL does."""
    import torch

    context, answer_ids = split_completion(tokenizer, prompt, answer)
    start = max(len(context), 1)  # the first token has no prediction to score
    ids = torch.tensor([context + answer_ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    answer_part = logprobs[start - 1 :]
    return float(answer_part.sum()), int(answer_part.numel())


def _score(scores: PairScores, *, reward_accuracy: float | None = None, margin: float | None = None) -> Score:
    preference = {
        "preference_accuracy": scores.accuracy(),
        "chosen_logprob": _mean(scores.chosen),
        "rejected_logprob": _mean(scores.rejected),
    }
    if reward_accuracy is not None:
        preference |= {"reward_accuracy": reward_accuracy, "reward_margin": margin}
    return Score(exact_match=0.0, normalized_exact_match=0.0, preference=preference)


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


ROWS = [
    ("reward accuracy (vs base as reference)", "reward_accuracy", percent),
    ("reward margin (mean)", "reward_margin", number),
    ("preference accuracy (chosen more likely)", "preference_accuracy", percent),
    ("chosen log-probability (mean)", "chosen_logprob", number),
    ("rejected log-probability (mean)", "rejected_logprob", number),
]


def headline(report: EvalReport) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) as display strings; the reward needs a reference, so the base has none."""
    rows = []
    for name, key, show in ROWS:
        base = (report.base.preference or {}).get(key) if report.base else None
        rows.append((name, show(base) if base is not None else "n/a", show((report.tuned.preference or {})[key])))
    return rows


def format_preference_markdown(report: EvalReport, run_name: str) -> str:
    lines = [f"# Evaluation of `{run_name}`", "", f"Data: `{report.data}` ({report.rows} pairs).", ""]
    lines += markdown_table(["metric", "base", "fine-tuned"], [list(row) for row in headline(report)])
    lines += ["", "## Greedy answers", ""]
    lines += markdown_table(
        ["prompt", "chosen", "base", "fine-tuned"],
        [[table_cell(e[k]) for k in ("input", "reference", "base", "tuned")] for e in report.examples],
    )
    return "\n".join(lines) + "\n"


def format_preference_console(report: EvalReport, run_dir: str) -> str:
    rows = headline(report)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"Held-out preference evaluation on {report.data} ({report.rows} pairs):"]
    lines.append(f"  {'':{width}}  {'base':>9}  {'fine-tuned':>10}")
    lines += [f"  {name:{width}}  {base:>9}  {tuned:>10}" for name, base, tuned in rows]
    for example in report.examples[:3]:
        lines.append(f"    e.g. {example['input']!r} -> {example['tuned']!r} (chosen {example['reference']!r})")
    lines.append(f"Report written to {run_dir}/{EVAL_MARKDOWN} and {EVAL_JSON}")
    return "\n".join(lines)
