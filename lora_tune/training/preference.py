"""`train(recipe)` for the preference objectives (training.objective: dpo, orpo, kto, simpo), usually after SFT.

The same run directory, checkpoints, resume, stop signals, divergence stop and atomic adapter save as SFT; TRL's
preference trainers do the loop. With an adapter the reference policy is the model with the adapter switched off
(peft), so no second copy of the weights is loaded; ORPO and SimPO need no reference at all. The starting point is
the base, or an earlier lora-tune run through `adapter.init_from` (sequential fine-tuning, with lineage).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from lora_tune.check import PREFLIGHT_FILE, preflight
from lora_tune.check.preference import preference_report
from lora_tune.data.preference import PreferenceSplits, load_preference_splits
from lora_tune.errors import LoraTuneError
from lora_tune.methods import runtime as methods
from lora_tune.methods.runtime import artifact_name, save_artifact
from lora_tune.model.load import count_quantized_layers, load_model, load_tokenizer, resolve_dtype
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import TEST_SPLIT, RunDir, adapter_build_dir, write_json_atomic, write_text_atomic
from lora_tune.run.outputs import replace_dir_atomic
from lora_tune.training.distributed import Processes
from lora_tune.training.divergence import Divergence, raise_if_diverged
from lora_tune.training.faults import translate_faults
from lora_tune.training.log import (
    last_value,
    peak_memory,
    plot_loss,
    read_metrics,
)
from lora_tune.training.result import RunResult, best_checkpoint
from lora_tune.training.resume import open_run, resume_hint, train_or_finish
from lora_tune.training.signals import StopRequest, graceful_stop, raise_if_stopped
from lora_tune.training.trainer_setup import prepare_trainer, run_callbacks
from lora_tune.training.trl_args import preference_classes, to_preference_config

log = logging.getLogger(__name__)


class PreferenceError(LoraTuneError):
    """A preference run that cannot go ahead as configured."""


def train_preference(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    recipe_path: str | None,
    overrides: Sequence[str],
) -> RunResult:
    """Train the recipe's adapter on preference rows; return where it is and the key numbers."""
    started = time.monotonic()
    if Processes.from_env().distributed:
        raise PreferenceError("training.objective: preference runs use one process here; run without --nproc")
    objective = recipe.training.objective
    args = to_preference_config(recipe, recipe.run_dir.checkpoints, resolve_dtype(recipe.model.dtype))

    # 1. Run directory (refuse to clobber; on resume, the newest complete checkpoint), recipe and provenance first.
    run, start = open_run(recipe, overwrite=overwrite, resume=resume, recipe_path=recipe_path)
    write_json_atomic(run.root / methods.LINEAGE_FILE, methods.lineage(recipe))
    hint, stop, diverged = resume_hint(recipe_path, overrides), StopRequest(), Divergence()

    # 2. Tokenizer and data: every row checked (pairs that prefer nothing, empty answers) before the model loads.
    tokenizer = load_tokenizer(recipe.model)
    preflight(recipe, tokenizer, run.root / PREFLIGHT_FILE, preference_report)  # writes preflight.json
    splits = load_preference_splits(recipe)
    _write_test_split(run, splits)
    log.info("data: %d training, %d validation %s rows", len(splits.train), len(splits.validation), objective)

    # 3. Base model (quantized as the recipe says) with the method applied; the reference is the adapter switched off.
    import transformers
    from datasets import Dataset

    transformers.set_seed(recipe.training.seed)
    model = load_model(recipe.model, recipe.quantization, recipe.training, "ddp")
    quantized_layers = count_quantized_layers(model)
    model, peft_config = methods.prepare_model(recipe, model)

    # 4. Trainer: TRL's trainer for the objective.
    trainer_class = preference_classes(objective)[0]
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(splits.train),
        eval_dataset=Dataset.from_list(splits.validation) if splits.validation else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=run_callbacks(recipe, run, stop, diverged),
    )
    prepare_trainer(trainer, recipe, run)

    # 5. Train (from the checkpoint when resuming); SIGTERM/SIGINT save a checkpoint and stop.
    with graceful_stop(stop), translate_faults(recipe, run.checkpoints, hint):
        output = train_or_finish(trainer, start.checkpoint)
    raise_if_stopped(stop, trainer.state.global_step, str(run.checkpoints), hint)
    raise_if_diverged(diverged, run.checkpoints, recipe.training.learning_rate)
    final = trainer.evaluate() if splits.validation else {}

    # 6. Save the adapter atomically, then the summary.
    build = adapter_build_dir(run)
    save_artifact(recipe, trainer, tokenizer, build, run.root)
    replace_dir_atomic(build, run.root / artifact_name(recipe))
    return _summarize(recipe, run, trainer, splits, final, output.global_step, quantized_layers, started)


def _summarize(
    recipe: Recipe,
    run: RunDir,
    trainer: Any,
    splits: PreferenceSplits,
    final: dict[str, float],
    steps: int,
    quantized_layers: int,
    started: float,
) -> RunResult:
    records = read_metrics(run.metrics)
    trainable, total = methods.parameter_counts(trainer.model)
    result = RunResult(
        run_dir=run.root,
        adapter_dir=run.root / artifact_name(recipe),
        steps=steps,
        train_loss=last_value(records, "loss"),
        eval_loss=final.get("eval_loss"),
        tokens_seen=None,
        trained_token_share=None,
        train_rows=len(splits.train),
        validation_rows=len(splits.validation),
        trainable_parameters=trainable,
        quantized_layers=quantized_layers,
        wall_seconds=round(time.monotonic() - started, 1),
        memory=peak_memory(),
        best=best_checkpoint(trainer.state, recipe, steps),
        method=recipe.adapter.method,
        total_parameters=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
        objective=recipe.training.objective,
        reward_accuracy=final.get("eval_rewards/accuracies"),
        reward_margin=final.get("eval_rewards/margins"),
    )
    result.loss_plot = plot_loss(records, run.loss_plot, title=f"{run.root.name}: loss")
    write_json_atomic(run.summary, result.to_json())
    return result


def _write_test_split(run: RunDir, splits: PreferenceSplits) -> None:
    """The held-out pairs, one JSON row each, for `lora-tune eval` (nothing when the recipe holds none out)."""
    import json

    if splits.test:
        lines = [json.dumps(row, ensure_ascii=False) for row in splits.test]
        write_text_atomic(run.root / TEST_SPLIT, "\n".join(lines) + "\n")
