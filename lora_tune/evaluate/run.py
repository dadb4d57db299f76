"""What every task's evaluation shares: the finished run opened with its recipe, `eval:` settings and held-out data
(`open_evaluation`), and the report written into it (`write_report`: eval.json, eval.md, loss.png). Each task scores
in its own folder (lora_tune/tasks/<task>/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_tune.errors import LoraTuneError
from lora_tune.evaluate.result import EvalReport
from lora_tune.inference.load import ModelFolderError, run_artifact
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.schema import EvalConfig, Recipe
from lora_tune.run.layout import EVAL_JSON, EVAL_MARKDOWN, LOSS_PLOT, RunDir, write_json_atomic
from lora_tune.run.outputs import check_replaceable, ensure_writable, write_text_atomic
from lora_tune.training.log import plot_loss, read_metrics


class RunNotFoundError(LoraTuneError):
    """The directory is not a finished lora-tune run."""


class EvalDataError(LoraTuneError):
    """No held-out data to evaluate on, or data that cannot be scored as asked."""


def resolve_eval_data(run: RunDir, data: str | None, split: str | None) -> Path:
    """`--data FILE`, else the run's saved split file (`RUN_DIR/<split>.jsonl`, `test` by default)."""
    if data is not None and split is not None:
        raise EvalDataError("give either --data FILE or --split NAME, not both")
    if data is not None:
        return Path(data)
    name = split or "test"
    path = run.split(name)
    if not path.is_file():
        raise EvalDataError(
            f"{run.root}: no '{name}' split saved in the run ({path.name} not found); pass --data FILE "
            "(alpaca or messages rows) to evaluate on held-out data"
        )
    return path


@dataclass(frozen=True)
class Evaluation:
    """What every task's evaluation starts from: the finished run, its recipe, the `eval:` settings with the command
    line's overrides, and the held-out data file."""

    run: RunDir
    recipe: Recipe
    settings: EvalConfig
    path: Path


def open_evaluation(
    run_dir: str | Path,
    data: str | None = None,
    *,
    split: str | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
) -> Evaluation:
    """Check that `run_dir` is a finished run whose directory takes the report, and find the held-out data."""
    run = RunDir(Path(run_dir))
    try:
        run_artifact(run)
    except ModelFolderError as exc:
        raise RunNotFoundError(str(exc)) from None

    ensure_writable(run.root, "run_dir")  # eval.json and eval.md go there: fail now, not after scoring
    check_replaceable(run.root, [EVAL_JSON, EVAL_MARKDOWN, LOSS_PLOT], "run_dir")

    recipe = load_recipe(run.recipe, check_paths=False)
    settings = recipe.eval.model_copy(
        update={k: v for k, v in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)) if v is not None}
    )
    return Evaluation(run, recipe, settings, resolve_eval_data(run, data, split))


def write_report(run: RunDir, report: EvalReport, markdown: Callable[[EvalReport, str], str]) -> None:
    """eval.json, eval.md (rendered by the task's `markdown`) and (from metrics.jsonl) loss.png in the run
    directory."""
    plot = plot_loss(read_metrics(run.metrics), run.loss_plot, title=f"{run.root.name}: loss")
    report.files = {"json": str(run.eval_json), "markdown": str(run.eval_markdown)}
    if plot is not None:
        report.files["loss_curve"] = str(plot)
    write_json_atomic(run.eval_json, asdict(report))
    write_text_atomic(run.eval_markdown, markdown(report, run.root.name))
