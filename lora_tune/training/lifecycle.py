"""The run lifecycle: one training run, start to end, for every task. Reads top to bottom, one numbered step at a time.

A task (lora_tune/tasks/<task>/) supplies only what differs, as a `TaskTraining`: its trainer arguments, pre-flight
checks, data, model (with its head), trainer and summary figures. Everything else is the lifecycle's and every task
inherits it: the locked run folder with its recipe, data fingerprint and provenance; the pre-flight report; sealed
checkpoints with `save_total_limit`, exact resume, the SIGTERM/SIGINT checkpoint, the divergence stop, the free-disk
check, early stopping and the best checkpoint (the shared callbacks); the artefact saved atomically; the summary.
TRL's (or transformers') trainer stays the loop: the lifecycle wraps it, it does not replace it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport, preflight
from lora_tune.errors import LoraTuneError
from lora_tune.methods import runtime as methods
from lora_tune.model.load import count_quantized_layers, load_model, load_tokenizer, resolve_dtype
from lora_tune.recipe.schema import Recipe
from lora_tune.recipe.strategy import SHARDED
from lora_tune.run.layout import RunDir, adapter_build_dir, write_json_atomic, write_text_atomic
from lora_tune.run.outputs import replace_dir_atomic
from lora_tune.training import distributed, processes
from lora_tune.training.divergence import Divergence, raise_if_diverged, sampling_divergence
from lora_tune.training.faults import translate_faults
from lora_tune.training.levers import check_levers
from lora_tune.training.log import last_value, peak_memory, plot_loss, read_metrics
from lora_tune.training.result import RunResult, best_checkpoint
from lora_tune.training.resume import restore_token_count, resume_hint, resume_point_of
from lora_tune.training.run_folder import open_run
from lora_tune.training.signals import StopRequest, graceful_stop, raise_if_stopped
from lora_tune.training.trainer_setup import prepare_trainer, run_callbacks

log = logging.getLogger(__name__)


class LifecycleError(LoraTuneError):
    """A run the task cannot do as launched."""


@dataclass(frozen=True)
class Launch:
    """How this run is spread: the processes, the strategy, the batch shape (per device, processes, gradient
    accumulation) and whether batch items are packed rows of several examples."""

    procs: distributed.Processes
    strategy: str
    batch: tuple[int, int, int]
    packed: bool

    @property
    def sharded(self) -> bool:  # FSDP / ZeRO-3 across processes: the adapter is gathered before it is saved
        return self.strategy in SHARDED and self.procs.distributed


@dataclass
class TaskData:
    """A task's training data: the splits the trainer takes, and what the summary reports of them."""

    train: Any  # a datasets.Dataset
    validation: Any | None
    figures: dict[str, Any] = field(default_factory=dict)  # RunResult fields the data gives (trained_token_share)


@dataclass
class TaskModel:
    """The base as the task trains it: the model (its head added, frozen or wrapped by the recipe's method), the
    peft config the trainer applies (None when the model is already wrapped or fully trained), and the count of
    quantized layers, the evidence that the base is quantized."""

    model: Any
    peft_config: Any
    quantized_layers: int


class TaskTraining:
    """What a task supplies to the lifecycle: only what differs between tasks. Subclasses live in
    lora_tune/tasks/<task>/training.py and are registered in lora_tune/tasks/__init__.py."""

    name = ""
    processes = False  # whether it runs in several processes (torchrun, accelerate launch)

    def arguments(self, recipe: Recipe, checkpoints: Path, dtype: Any) -> Any:
        """The trainer's arguments (a TrainingArguments subclass), checkpoints written to `checkpoints`."""
        raise NotImplementedError

    def packed(self, recipe: Recipe) -> bool:
        """Whether the batch items are packed rows of several examples."""
        return False

    def checks(self, recipe: Recipe, tokenizer: Any) -> PreflightReport:
        """The pre-flight checks on the recipe's data (also `lora-tune check`)."""
        raise NotImplementedError

    def data(self, recipe: Recipe, tokenizer: Any, run: RunDir, launch: Launch) -> TaskData:
        """The tokenized splits; the main process also writes the held-out split into the run for `eval`."""
        raise NotImplementedError

    def model(self, recipe: Recipe, tokenizer: Any, launch: Launch) -> TaskModel:
        """The base, loaded as the recipe says (seeded, quantized), with the task's head and the method applied."""
        raise NotImplementedError

    def trainer(
        self, recipe: Recipe, model: TaskModel, args: Any, data: TaskData, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        """The trainer that runs the loop, with the lifecycle's `callbacks`."""
        raise NotImplementedError

    def save_extras(self, recipe: Recipe, build: Path) -> None:
        """Files the task saves beside the artefact (a classifier's label names), before it is renamed into place."""

    def figures(self, recipe: Recipe, final: dict[str, float]) -> dict[str, Any]:
        """RunResult fields of this task from the final evaluation (reward accuracy, held-out accuracy)."""
        return {}

    def plots(self, run: RunDir) -> Path | None:
        """A plot the task draws beside the loss curve from metrics.jsonl (an RL run's rewards), or None."""
        return None


def row_data(run: RunDir, train: list[dict], validation: list[dict], test: list[dict], what: str) -> TaskData:
    """A task's rows as the trainer takes them (datasets), the held-out test rows written into the run, one JSON row
    each, for `lora-tune eval` (nothing when the recipe holds none out): the preference and RL tasks' data step."""
    from datasets import Dataset

    if test:
        write_text_atomic(run.test_split, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in test))
    log.info("data: %d training, %d validation %s", len(train), len(validation), what)
    return TaskData(Dataset.from_list(train), Dataset.from_list(validation) if validation else None)


def adapted_base(recipe: Recipe) -> TaskModel:
    """The base as a causal LM, loaded as the recipe says (seeded, quantized), with the recipe's method applied: what
    the preference and RL tasks train (their reference policy is the adapter switched off)."""
    import transformers

    transformers.set_seed(recipe.training.seed)
    model = load_model(recipe.model, recipe.quantization, recipe.training, "ddp")
    quantized_layers = count_quantized_layers(model)
    model, peft_config = methods.prepare_model(recipe, model)
    return TaskModel(model, peft_config, quantized_layers)


def run_training(
    task: TaskTraining,
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    recipe_path: str | None,
    overrides: Sequence[str],
) -> RunResult:
    """Train the recipe's adapter (or model) for `task`; return where it is and the key numbers. `resume` continues
    the run in output_dir from its newest complete checkpoint (lora_tune.training.resume)."""
    started = time.monotonic()

    # 0. Processes: under a launcher (torchrun, accelerate launch) building the trainer arguments joins the process
    #    group. The main process prepares steps 1-4 first; the others wait, then reuse its run directory and data.
    launch = _launch(task, recipe)
    args = task.arguments(recipe, recipe.run_dir.checkpoints, resolve_dtype(recipe.model.dtype))
    procs, main_first = launch.procs, processes.MainFirst(launch.procs)
    check_levers(recipe, on_gpu())  # a lever that cannot run here (Liger on the CPU) fails before any work

    # 1. Run directory: refuse to clobber another run or a user's files; on resume, check the recipe and data are
    #    unchanged and find the newest complete checkpoint; the resolved recipe, data fingerprint and environment
    #    first, so a crash at any later point is traceable and resumable.
    if procs.is_main:
        comment = processes.batch_comment(*launch.batch, launch.strategy, packed=launch.packed)
        run, start = open_run(recipe, overwrite=overwrite, resume=resume, recipe_path=recipe_path, comment=comment)
        write_json_atomic(run.lineage, methods.lineage(recipe))
    else:  # the main process has checked the run and set broken checkpoints aside: only read where it resumes
        run = recipe.run_dir
        start = resume_point_of(run, recipe, resume=resume, overwrite=overwrite)
    hint, stop, diverged = resume_hint(recipe_path, overrides), StopRequest(), Divergence()

    # 2. Tokenizer. From here to step 4, everything that can fail on the user's data fails before the model loads.
    tokenizer = load_tokenizer(recipe.model)

    # 3. Pre-flight check of the task on the data; writes preflight.json. A failed check stops the run (exit 2)
    #    unless the recipe sets preflight.on_failure: warn.
    if procs.is_main:
        preflight(recipe, tokenizer, run.preflight, task.checks)

    # 4. Data: the task's tokenized splits (built once, by the main process, when there are several).
    data = task.data(recipe, tokenizer, run, launch)
    main_first.release()
    processes.fail_here_for_test(procs)

    # 5. Base model, quantized as the recipe says, with the task's head and the method applied.
    model = task.model(recipe, tokenizer, launch)

    # 6. Trainer: the task's (TRL's or transformers') loop, with the callbacks every run shares.
    trainer = task.trainer(recipe, model, args, data, tokenizer, run_callbacks(recipe, run, stop, diverged))
    prepare_trainer(trainer, recipe, run)

    # 7. Train (from the checkpoint when resuming). SIGTERM/SIGINT save a checkpoint and stop; out-of-memory and a
    #    full disk become one line naming the last complete checkpoint.
    with graceful_stop(stop), translate_faults(recipe, run.checkpoints, hint), sampling_divergence(diverged, trainer):
        restore_token_count(trainer, start.checkpoint)  # TRL's count of trained tokens restarts at 0 otherwise
        output = train_or_finish(trainer, start.checkpoint)
    raise_if_stopped(stop, trainer.state.global_step, str(run.checkpoints), hint)
    raise_if_diverged(diverged, run.checkpoints, recipe.training.learning_rate)

    # 8. Evaluate once more at the end, when there is validation data (with keep_best: the best checkpoint, which
    #    the trainer has loaded back).
    final = trainer.evaluate() if data.validation is not None else {}

    # 9. Save the artefact atomically, on the main process (FSDP and ZeRO-3 first gather the sharded adapter).
    checksums = processes.replica_checksums(trainer.model, procs, launch.strategy)
    with translate_faults(recipe, run.checkpoints, hint):
        save_artifact_atomically(task, trainer, tokenizer, run, recipe, launch)
    processes.remove_prepared_data(run, procs)

    # 10. Summary: summary.json and the loss curve, on the main process.
    result = _summary(task, recipe, run, launch, trainer, data, final, output.global_step, model.quantized_layers)
    result.replica_checksums, result.wall_seconds = checksums, round(time.monotonic() - started, 1)
    log.info("trainable parameters: %d of %d (%.4f%%)", *result.parameter_share())
    if trainer.is_world_process_zero():
        result.loss_plot = plot_loss(read_metrics(run.metrics), run.loss_plot, title=f"{run.root.name}: loss")
        result.task_plot = task.plots(run)
        write_json_atomic(run.summary, result.to_json())
    return result


def _launch(task: TaskTraining, recipe: Recipe) -> Launch:
    procs = distributed.Processes.from_env()
    if procs.distributed and not task.processes:
        raise LifecycleError(f"{task.name} runs use one process here; run without --nproc")
    t = recipe.training
    batch = (t.batch_size, procs.world_size, t.gradient_accumulation_steps)
    return Launch(procs, distributed.resolve_strategy(recipe, procs), batch, task.packed(recipe))


def save_artifact_atomically(
    task: TaskTraining, trainer: Any, tokenizer: Any, run: RunDir, recipe: Recipe, launch: Launch
) -> None:
    """The adapter (or model) with the tokenizer and the task's extras, written into a marked build folder and renamed
    into place. FSDP / ZeRO-3: every process joins in gathering the sharded adapter; the main one writes it."""
    is_main = trainer.is_world_process_zero()
    if launch.sharded:
        processes.save_sharded_adapter(trainer, adapter_build_dir(run) if is_main else run.adapter_build)
    if not is_main:
        return
    if launch.sharded:
        build = run.adapter_build
        tokenizer.save_pretrained(build)
    else:  # a build folder a killed process left is started anew
        build = adapter_build_dir(run)
        methods.save_artifact(recipe, trainer, tokenizer, build, run)
    task.save_extras(recipe, build)
    replace_dir_atomic(build, run.root / methods.artifact_name(recipe))


def _summary(
    task: TaskTraining,
    recipe: Recipe,
    run: RunDir,
    launch: Launch,
    trainer: Any,
    data: TaskData,
    final: dict[str, float],
    steps: int,
    quantized_layers: int,
) -> RunResult:
    """The run's figures: from the trainer, the data, the launch and the task."""
    records = read_metrics(run.metrics)
    trainable, total = methods.parameter_counts(trainer.model)
    return RunResult(
        run_dir=run.root,
        adapter_dir=run.root / methods.artifact_name(recipe),
        steps=steps,
        train_loss=last_value(records, "loss"),
        eval_loss=final.get("eval_loss"),
        tokens_seen=last_value(records, "num_tokens"),  # TRL's count of trained tokens, where the trainer logs it
        train_rows=len(data.train),
        validation_rows=len(data.validation) if data.validation is not None else 0,
        trainable_parameters=trainable,
        quantized_layers=quantized_layers,
        wall_seconds=0.0,
        memory=peak_memory(),
        best=best_checkpoint(trainer.state, recipe, steps),
        processes=launch.procs.world_size,
        effective_batch_size=processes.effective_batch_size(*launch.batch),
        packed=launch.packed,
        strategy=launch.strategy,
        method=recipe.adapter.method,
        total_parameters=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
        objective=recipe.training.objective,
        **data.figures,
        **task.figures(recipe, final),
    )


def train_or_finish(trainer: Any, checkpoint: Path | None) -> Any:
    """`trainer.train`, resuming from `checkpoint`; or, when that checkpoint is the run's last step (the process
    died after sealing it, before the adapter was saved), its weights and state without training again.

    The Trainer resumed at global_step == max_steps in the middle of an epoch runs one step more (it checks the
    step count only after a step): a run of 8 steps ended with 9, and its adapter 0.0098 away from the unbroken one.
    """
    if checkpoint is None or not _is_last_step(checkpoint):
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    log.info("resume: %s is the run's last step; training is complete, finishing the run", checkpoint.name)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint is not None:
        trainer._load_best_model()  # as the Trainer does when it finishes training
    return TrainOutput(trainer.state.global_step, float("nan"), {})


def _is_last_step(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
