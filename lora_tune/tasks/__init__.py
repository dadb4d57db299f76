"""The tasks a recipe can train (`task.type`, and `training.objective` for the preference and RL stages): the registry.

A task is a folder, lora_tune/tasks/<task>/, holding what is particular to it: its training hooks (a
`TaskTraining` the one run lifecycle, lora_tune.training.lifecycle, calls), its pre-flight checks, its data and its
evaluation. This is the one place that chooses by task, as peft maps each PEFT type to its tuner: `train`, `check`,
`evaluate_run` and `preview` look the recipe's task up here; the stages never ask which task they serve. Adding a
task is one folder plus one entry in `TASKS` (docs/development.md, "Adding a task").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.check.report import PreflightReport
from lora_tune.data.preview import build_preview, format_preview
from lora_tune.evaluate import run
from lora_tune.evaluate.result import EvalReport
from lora_tune.model.load import load_tokenizer
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import release_run_dir, write_json_atomic
from lora_tune.run.outputs import check_own_json
from lora_tune.tasks.classification import evaluate as classification_eval
from lora_tune.tasks.classification.training import ClassificationTraining
from lora_tune.tasks.preference import evaluate as preference_eval
from lora_tune.tasks.preference.preview import format_preference_preview
from lora_tune.tasks.preference.training import PreferenceTraining
from lora_tune.tasks.rl import evaluate as rl_eval
from lora_tune.tasks.rl.preview import format_rl_preview
from lora_tune.tasks.rl.training import RLTraining
from lora_tune.tasks.sft import evaluate as sft_eval
from lora_tune.tasks.sft.training import SftTraining
from lora_tune.tasks.vision import evaluate as vision_eval
from lora_tune.tasks.vision.checks import format_vision_preview
from lora_tune.tasks.vision.training import VisionTraining
from lora_tune.training.lifecycle import TaskTraining, run_training
from lora_tune.training.log import quiet_third_party_noise
from lora_tune.training.processes import release_process_group
from lora_tune.training.result import RunResult


@dataclass(frozen=True)
class Task:
    name: str
    training: TaskTraining  # what the task adds to the run lifecycle (its checks too: `lora-tune check`)
    evaluate: Callable[..., EvalReport]  # (Evaluation, *, base, limit, progress): scores; writes eval.json/eval.md
    console: Callable[[EvalReport, str], str]  # (report, run_dir): the summary `lora-tune eval` prints
    report_kinds: tuple[str, ...]  # EvalReport.task of its reports
    preview: Callable[..., str]  # (recipe, tokenizer, *, n, color): what `lora-tune data` prints


def _preview_chat(recipe: Recipe, tokenizer: Any, *, n: int, color: bool) -> str:
    return format_preview(build_preview(recipe, tokenizer, n=n), tokenizer, color=color)


TASKS: dict[str, Task] = {
    "sft": Task(
        "sft",
        SftTraining(),
        sft_eval.evaluate_generations,
        sft_eval.format_report,
        ("text", "labels"),
        _preview_chat,
    ),
    "vision": Task(
        "vision",
        VisionTraining(),
        vision_eval.evaluate_vision,
        sft_eval.format_report,
        (vision_eval.TASK,),
        format_vision_preview,
    ),
    "preference": Task(
        "preference",
        PreferenceTraining(),
        preference_eval.evaluate_preference,
        preference_eval.format_preference_console,
        (preference_eval.TASK,),
        format_preference_preview,
    ),
    "rl": Task(
        "rl",
        RLTraining(),
        rl_eval.evaluate_rl,
        rl_eval.format_rl_console,
        (rl_eval.TASK,),
        format_rl_preview,
    ),
    "classification": Task(
        "classification",
        ClassificationTraining(),
        classification_eval.evaluate_head_run,
        classification_eval.format_console,
        (classification_eval.TASK,),
        _preview_chat,
    ),
}


def task_of(recipe: Recipe) -> Task:
    """The recipe's task: classification, sft, preference (dpo, orpo, kto, simpo) or rl (grpo, rloo), by
    Recipe.task_name."""
    return TASKS[recipe.task_name]


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    recipe_path: str | None = None,
    overrides: Sequence[str] = (),
) -> RunResult:
    """Train what the recipe describes; return where it is and the key numbers. `resume` continues the run in
    output_dir from its newest complete checkpoint. The run directory stays locked to this process until the run
    ends (lora_tune.run.layout)."""
    quiet_third_party_noise()
    try:
        return run_training(
            task_of(recipe).training,
            recipe,
            overwrite=overwrite,
            resume=resume,
            recipe_path=recipe_path,
            overrides=overrides,
        )
    finally:
        release_run_dir(recipe.run_dir)
        release_process_group()


CHECK_REPORT = "lora-tune check"  # the "written_by" of the reports `check` writes: only those are replaced


def check(recipe: Recipe, *, json_path: str | Path | None = None) -> PreflightReport:
    """`lora-tune check`: the task's pre-flight checks with the tokenizer training would use (no weights load);
    with `json_path`, the report also as JSON there (a file that is not an earlier report is refused first)."""
    if json_path is not None:
        check_own_json(Path(json_path), CHECK_REPORT, "json")  # before the check's work, not after it
    report = task_of(recipe).training.checks(recipe, load_tokenizer(recipe.model))
    if json_path is not None:
        write_json_atomic(Path(json_path), {"written_by": CHECK_REPORT, **report.to_json()})
    return report


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    *,
    split: str | None = None,
    base: bool = True,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Score a finished run on held-out data (its saved test split unless `data` or `split` says otherwise), side
    by side with its base; writes eval.json and eval.md into the run directory."""
    evaluation = run.open_evaluation(run_dir, data, split=split, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return task_of(evaluation.recipe).evaluate(evaluation, base=base, limit=limit, progress=progress)


def preview(recipe: Recipe, *, n: int = 3, color: bool = False) -> str:
    """`lora-tune data`: what the task will train on, with the tokenizer training uses (no weights load)."""
    tokenizer = load_tokenizer(recipe.model)
    return task_of(recipe).preview(recipe, tokenizer, n=n, color=color)


def format_report(report: EvalReport, run_dir: str) -> str:
    """The console summary of an evaluation, as the task that produced it writes it."""
    task = next(t for t in TASKS.values() if report.task in t.report_kinds)
    return task.console(report, run_dir)
