"""Evaluate a run directory: the base model and base + adapter, loaded as in training, on held-out data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError
from lora_tune.run_dir import RunDir, write_json_atomic


class RunNotFoundError(LoraTuneError):
    """The directory is not a finished lora-tune run."""


@dataclass
class Score:
    exact_match: float
    normalized_exact_match: float
    examples: list[dict[str, str]] = field(default_factory=list)  # a few predictions, to look at


@dataclass
class EvalReport:
    data: str
    rows: int
    tuned: Score
    base: Score | None = None


def evaluate_run(
    run_dir: str | Path, data: str, *, base: bool = True, limit: int | None = None, max_new_tokens: int = 32
) -> EvalReport:
    """Greedy answers on `data` (alpaca or messages rows) by base + adapter and, with `base`, by the base alone."""
    run = RunDir(Path(run_dir))
    if not run.is_run() or not (run.adapter / "adapter_config.json").is_file():
        raise RunNotFoundError(f"{run.root}: not a finished lora-tune run (no recipe.yaml or adapter/)")
    from peft import PeftModel

    from lora_tune.config import DatasetConfig
    from lora_tune.data import load_rows, normalize_rows
    from lora_tune.evaluate import generate_answers, reference_answer
    from lora_tune.modeling import load_model, load_tokenizer
    from lora_tune.recipe import load_recipe

    recipe = load_recipe(run.recipe, check_paths=False)
    source = DatasetConfig(path=data, limit=limit)
    conversations = normalize_rows(load_rows(source), source)
    references = [reference_answer(c) for c in conversations]
    # The tokenizer saved with the adapter is the one the training examples were built with.
    tokenizer = load_tokenizer(recipe.model.model_copy(update={"tokenizer": str(run.adapter), "chat_template": None}))
    model = load_model(
        recipe.model, recipe.quantization, recipe.training.model_copy(update={"gradient_checkpointing": False})
    )
    from lora_tune.safety import check_weights_format

    check_weights_format(str(run.adapter), "adapter", recipe.model.allow_pickle, key=str(run.root))
    model = PeftModel.from_pretrained(model, run.adapter)
    model.eval()

    def score() -> Score:
        answers = generate_answers(model, tokenizer, conversations, max_new_tokens=max_new_tokens)
        return _score(answers, references, conversations)

    report = EvalReport(data=data, rows=len(conversations), tuned=score())
    if base:
        with model.disable_adapter():
            report.base = score()
    write_json_atomic(run.root / "eval.json", asdict(report))
    return report


def _score(answers: list[str], references: list[str], conversations: list[Any]) -> Score:
    from lora_tune.evaluate import exact_match, normalized_exact_match

    examples = [
        {"prompt": c[-2]["content"], "reference": r, "prediction": a}
        for c, r, a in zip(conversations[:5], references[:5], answers[:5], strict=True)
    ]
    return Score(exact_match(answers, references), normalized_exact_match(answers, references), examples)


def format_report(report: EvalReport, run_dir: str) -> str:
    lines = [f"Held-out exact match on {report.data} ({report.rows} rows):"]
    if report.base is not None:
        lines.append(
            f"  base model   {report.base.exact_match:7.1%}   (normalised {report.base.normalized_exact_match:.1%})"
        )
    lines.append(
        f"  fine-tuned   {report.tuned.exact_match:7.1%}   (normalised {report.tuned.normalized_exact_match:.1%})"
    )
    for example in report.tuned.examples[:3]:
        lines.append(
            f"    e.g. {example['prompt']!r} -> {example['prediction']!r} (expected {example['reference']!r})"
        )
    lines.append(f"Report written to {Path(run_dir) / 'eval.json'}")
    return "\n".join(lines)
