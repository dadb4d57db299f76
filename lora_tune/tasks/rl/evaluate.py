"""Evaluating an online RL run (grpo, rloo) on held-out prompts, base vs tuned.

Both models answer every prompt with the recipe's `eval:` generation settings (greedy unless it samples), and the
run's own rewards score the answers as they scored the completions during training: the mean of each reward, the
weighted total, and the pass rate (the share of answers the `answer` reward accepts, when the run has one). The
report (`eval.json`, `eval.md`) shows them side by side with a few answers of both models.
"""

from __future__ import annotations

from typing import Any

from lora_tune.evaluate.report import markdown_table, number, percent, table_cell
from lora_tune.evaluate.result import EvalReport, Score
from lora_tune.evaluate.run import EvalDataError, Evaluation, write_report
from lora_tune.inference.answers import generate_answers
from lora_tune.inference.load import load_run_model
from lora_tune.recipe.schema import DatasetConfig
from lora_tune.run.layout import EVAL_JSON, EVAL_MARKDOWN
from lora_tune.tasks.rl.data import prompt_rows_with_origins, reference_column
from lora_tune.tasks.rl.rewards import Scored, build_rewards

TASK = "rl"


def evaluate_rl(evaluation: Evaluation, *, base: bool = True, limit: int | None = None, progress: bool = True):
    """Base vs tuned rewards on the held-out prompts; writes eval.json and eval.md into the run directory."""
    ev, column = evaluation, reference_column(evaluation.recipe)
    try:
        rows = [row for _, row in prompt_rows_with_origins(DatasetConfig(path=str(ev.path), limit=limit), column)]
    except Exception as exc:
        raise EvalDataError(f"{ev.path}: an RL run is scored on prompt rows: {exc}") from None
    rewards = build_rewards(ev.recipe.rl.rewards)
    weights = [r.weight for r in ev.recipe.rl.rewards]
    model, tokenizer = load_run_model(ev.run)
    prompts = [row["prompt"] for row in rows]

    def score() -> tuple[Score, list[str]]:
        answers = generate_answers(model, tokenizer, prompts, settings=ev.settings, progress=progress)
        return reward_score(rewards, weights, rows, answers, tokenizer), answers

    tuned, tuned_answers = score()
    base_score, base_answers = None, None
    if base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_score, base_answers = score()
    report = EvalReport(
        data=str(ev.path),
        rows=len(rows),
        tuned=tuned,
        base=base_score,
        task=TASK,
        settings={**ev.settings.model_dump(), "objective": ev.recipe.training.objective},
    )
    report.examples = [
        {
            "input": row["prompt"][-1]["content"],
            "reference": str(row.get(column, "")),
            **({"base": base_answers[i]} if base_answers is not None else {}),
            "tuned": tuned_answers[i],
        }
        for i, row in enumerate(rows[: ev.settings.examples])
    ]
    write_report(ev.run, report, format_rl_markdown)
    return report


def reward_score(
    rewards: list[Scored], weights: list[float], rows: list[dict[str, Any]], answers: list[str], tokenizer: Any
) -> Score:
    """Each reward's mean over the answers, the weighted total and the answer reward's pass rate."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"}
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    means: dict[str, float | None] = {}
    totals = [0.0] * len(answers)
    for reward, weight in zip(rewards, weights, strict=True):
        scores = reward(prompts=[r["prompt"] for r in rows], completions=completions, completion_ids=ids, **columns)
        present = [float(s) for s in scores if s is not None]
        means[reward.__name__] = sum(present) / len(present) if present else None
        totals = [t + weight * float(s or 0.0) for t, s in zip(totals, scores, strict=True)]
    answer = next((r for r in rewards if r.__name__ == "answer"), None)
    rl = {
        "reward": sum(totals) / len(totals),
        "rewards": means,
        "pass_rate": sum(s == 1.0 for s in answer.last) / len(answer.last) if answer is not None else None,
    }
    share = rl["pass_rate"] if rl["pass_rate"] is not None else 0.0
    return Score(exact_match=share, normalized_exact_match=share, rl=rl)


def headline(report: EvalReport) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) as display strings."""
    tuned = report.tuned.rl or {}
    base = (report.base.rl or {}) if report.base else None
    rows = []
    if tuned.get("pass_rate") is not None:
        rows.append(("pass rate (answer reward = 1)", _show(base, "pass_rate", percent), percent(tuned["pass_rate"])))
    rows.append(("total reward (mean, weighted)", _show(base, "reward", number), number(tuned["reward"])))
    for name, value in tuned["rewards"].items():
        base_value = (base or {}).get("rewards", {}).get(name) if base is not None else None
        rows.append((f"reward {name} (mean)", number(base_value) if base is not None else "n/a", number(value)))
    return rows


def _show(scores: dict[str, Any] | None, key: str, show: Any) -> str:
    return show(scores.get(key)) if scores is not None else "n/a"


def format_rl_markdown(report: EvalReport, run_name: str) -> str:
    lines = [f"# Evaluation of `{run_name}`", "", f"Data: `{report.data}` ({report.rows} prompts).", ""]
    lines += markdown_table(["metric", "base", "fine-tuned"], [list(row) for row in headline(report)])
    keys = ["input", "reference", *(["base"] if report.base else []), "tuned"]
    lines += ["", "## Answers", ""]
    lines += markdown_table(
        ["prompt", "reference", *(["base"] if report.base else []), "fine-tuned"],
        [[table_cell(e[k]) for k in keys] for e in report.examples],
    )
    return "\n".join(lines) + "\n"


def format_rl_console(report: EvalReport, run_dir: str) -> str:
    rows = headline(report)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"Held-out reward evaluation on {report.data} ({report.rows} prompts):"]
    lines.append(f"  {'':{width}}  {'base':>9}  {'fine-tuned':>10}")
    lines += [f"  {name:{width}}  {base:>9}  {tuned:>10}" for name, base, tuned in rows]
    for example in report.examples[:3]:
        lines.append(f"    e.g. {example['input']!r} -> {example['tuned']!r} (reference {example['reference']!r})")
    lines.append(f"Report written to {run_dir}/{EVAL_MARKDOWN} and {EVAL_JSON}")
    return "\n".join(lines)
