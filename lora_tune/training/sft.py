"""`train(recipe)`: one recipe in, one trained adapter out. Reads top to bottom, one numbered step at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_tune.check import PREFLIGHT_FILE, preflight
from lora_tune.data import write_test_split
from lora_tune.data.packing import (
    log_batching,  # padding fraction, packed and padded
    packing_plan,
)
from lora_tune.methods import runtime as methods
from lora_tune.methods.runtime import artifact_name, save_artifact
from lora_tune.model.attention import use_varlen_attention
from lora_tune.model.load import count_quantized_layers, load_model, load_tokenizer, resolve_dtype
from lora_tune.recipe.schema import Recipe
from lora_tune.recipe.strategy import SHARDED
from lora_tune.run.layout import RunDir, adapter_build_dir, write_json_atomic
from lora_tune.run.outputs import replace_dir_atomic
from lora_tune.training import distributed as dist
from lora_tune.training import processes as ranks
from lora_tune.training.divergence import Divergence, raise_if_diverged
from lora_tune.training.faults import translate_faults
from lora_tune.training.levers import apply_liger, check_levers, describe_levers
from lora_tune.training.log import (
    last_value,
    peak_memory,
    plot_loss,
    read_metrics,
)
from lora_tune.training.result import RunResult, best_checkpoint
from lora_tune.training.resume import (
    open_run,
    restore_token_count,
    resume_hint,
    resume_point_of,
    train_or_finish,
)
from lora_tune.training.signals import StopRequest, graceful_stop, raise_if_stopped
from lora_tune.training.trainer_setup import prepare_trainer, run_callbacks
from lora_tune.training.trl_args import to_sft_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """How this run is spread: the processes, the strategy, the batch shape (per device, processes, gradient
    accumulation) and whether batch items are packed rows of several examples."""

    procs: dist.Processes
    strategy: str
    batch: tuple[int, int, int]
    packed: bool

    @property
    def sharded(self) -> bool:  # FSDP / ZeRO-3 across processes: the adapter is gathered before it is saved
        return self.strategy in SHARDED and self.procs.distributed


def train_sft(
    recipe: Recipe,
    *,
    overwrite: bool,
    resume: bool,
    recipe_path: str | None,
    overrides: Sequence[str],
) -> RunResult:
    """Train the recipe's adapter on its chat data; return where it is and the key numbers. `resume` continues the run
    in output_dir from its newest complete checkpoint (see `lora_tune.training.resume`)."""
    started = time.monotonic()

    # 0. Processes: under a launcher (torchrun, accelerate launch) building the trainer arguments joins the process
    #    group. The main process prepares steps 1-4 first; the others wait, then reuse its run directory and data.
    procs = dist.Processes.from_env()
    t = recipe.training
    launch = Launch(
        procs,
        dist.resolve_strategy(recipe, procs),
        (t.batch_size, procs.world_size, t.gradient_accumulation_steps),
        packing_plan(recipe).enabled,
    )
    args = to_sft_config(recipe, recipe.run_dir.checkpoints, resolve_dtype(recipe.model.dtype))
    main_first = ranks.MainFirst(procs)
    check_levers(recipe, _on_gpu())  # a lever that cannot run here (Liger on the CPU) fails before any work

    # 1. Run directory: refuse to clobber another run; on resume, check the recipe and data are unchanged and find
    #    the newest complete checkpoint; record the resolved recipe and environment first, so a crash is traceable.
    if procs.is_main:
        comment = ranks.batch_comment(*launch.batch, launch.strategy, packed=launch.packed)
        run, start = open_run(recipe, overwrite=overwrite, resume=resume, recipe_path=recipe_path, comment=comment)
        write_json_atomic(run.root / methods.LINEAGE_FILE, methods.lineage(recipe))
    else:  # the main process has checked the run and set broken checkpoints aside: only read where it resumes
        run = recipe.run_dir
        start = resume_point_of(run, recipe, resume=resume, overwrite=overwrite)
    hint, stop, diverged = resume_hint(recipe_path, overrides), StopRequest(), Divergence()

    # 2. Tokenizer. From here to step 4, everything that can fail on the user's data fails before the model loads.
    tokenizer = load_tokenizer(recipe.model)

    # 3. Pre-flight check on a sample of the data: each assistant turn trains a stop token the generation config
    #    stops on, masks are sane, the template saved with the adapter is the one used here. Writes preflight.json;
    #    a failed check stops the run (exit 2) unless the recipe sets preflight.on_failure: warn.
    if procs.is_main:
        preflight(recipe, tokenizer, run.root / PREFLIGHT_FILE)

    # 4. Data: tokenized, assistant-masked train (and validation) splits; tokenized once, by the main process.
    prepared = ranks.prepare_data(recipe, tokenizer, run.root, procs)
    main_first.release()
    ranks.fail_here_for_test(procs)
    _log_data(recipe, launch, prepared)
    if procs.is_main:
        write_test_split(prepared, run.root)
    train_set, eval_set = prepared.datasets["train"], prepared.datasets.get("validation")

    # 5. Base model, 4-bit/8-bit when the recipe quantizes, prepared for k-bit training; speed levers applied.
    model, peft_config, quantized_layers = _load_base(recipe, launch)

    # 6. Trainer: TRL does the loop; peft wraps the model with the recipe's adapter.
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=run_callbacks(recipe, run, stop, diverged),
    )
    prepare_trainer(trainer, recipe, run)

    # 7. Train (from the checkpoint when resuming). SIGTERM/SIGINT save a checkpoint and stop; out-of-memory and a
    #    full disk become one line naming the last complete checkpoint.
    with graceful_stop(stop), translate_faults(recipe, run.checkpoints, hint):
        restore_token_count(trainer, start.checkpoint)  # TRL's count of trained tokens restarts at 0 otherwise
        output = train_or_finish(trainer, start.checkpoint)
    raise_if_stopped(stop, trainer.state.global_step, str(run.checkpoints), hint)
    raise_if_diverged(diverged, run.checkpoints, recipe.training.learning_rate)

    # 8. Evaluate once more at the end, when there is validation data (with keep_best: the best checkpoint, which
    #    the trainer has loaded back).
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    # 9. Save the adapter (with the tokenizer and its chat template) atomically, on the main process only
    #    (FSDP and ZeRO-3 first gather the sharded adapter: every process takes part in that).
    checksums = ranks.replica_checksums(trainer.model, procs, launch.strategy)
    if launch.sharded:  # only the main process writes: it makes the build folder first
        ranks.save_sharded_adapter(trainer, adapter_build_dir(run) if procs.is_main else run.adapter_build)
    if trainer.is_world_process_zero():
        with translate_faults(recipe, run.checkpoints, hint):
            _save_adapter(trainer, tokenizer, run, recipe, gathered=launch.sharded)
    ranks.remove_prepared_data(run.root, procs)

    # 10. Summary: metrics file, loss curve, summary.json.
    records = read_metrics(run.metrics)
    result = _result(
        recipe, run, launch, trainer, records, prepared,
        steps=output.global_step,
        eval_loss=eval_loss,
        quantized_layers=quantized_layers,
        best=best_checkpoint(trainer.state, recipe, output.global_step),
        replica_checksums=checksums,
        wall_seconds=round(time.monotonic() - started, 1),
    )  # fmt: skip
    log.info("trainable parameters: %d of %d (%.4f%%)", *result.parameter_share())
    if trainer.is_world_process_zero():
        result.loss_plot = plot_loss(records, run.loss_plot, title=f"{run.root.name}: loss")
        write_json_atomic(run.summary, result.to_json())
    return result


def _log_data(recipe: Recipe, launch: Launch, prepared: Any) -> None:
    """The batch shape, what the pipeline kept and dropped, and the padding share of packed and padded batches."""
    where = launch.strategy if launch.procs.distributed else "one process"
    log.info("%s (%s)", ranks.describe_batch(*launch.batch, launch.packed), where)
    log.info("data: %s", prepared.stats.summary().replace("\n", "; "))
    lengths = [len(ids) for ids in prepared.datasets["train"]["input_ids"]]
    log_batching(recipe, lengths, on_gpu=_on_gpu())


def _load_base(recipe: Recipe, launch: Launch) -> tuple[Any, Any, int]:
    """The base model as the recipe loads it (seeded; quantized, on this process's device), the method applied
    (frozen layers, or the peft config TRL applies), Liger and the attention kernel chosen; and its count of
    quantized layers, the evidence that it is quantized."""
    import transformers

    transformers.set_seed(recipe.training.seed)
    ranks.set_loading_environment(launch.strategy, launch.procs)
    model = load_model(recipe.model, recipe.quantization, recipe.training, launch.strategy)
    quantized_layers = count_quantized_layers(model)
    model, peft_config = methods.prepare_model(recipe, model)
    if recipe.training.liger:
        apply_liger(model)
    attention = use_varlen_attention(model, recipe, packed=launch.packed)
    log.info("speed: %s", describe_levers(recipe, resolve_dtype(recipe.model.dtype), attention))
    return model, peft_config, quantized_layers


def _result(
    recipe: Recipe,
    run: RunDir,
    launch: Launch,
    trainer: Any,
    records: list[dict[str, Any]],
    prepared: Any,
    **measured: Any,
) -> RunResult:
    """The run's figures from the trainer, the data and the launch, with the ones train_sft `measured` itself."""
    trainable, total = methods.parameter_counts(trainer.model)
    eval_set = prepared.datasets.get("validation")
    return RunResult(
        run_dir=run.root,
        adapter_dir=run.root / methods.artifact_name(recipe),
        train_loss=last_value(records, "loss"),
        tokens_seen=last_value(records, "num_tokens"),
        trained_token_share=round(prepared.stats.train.trained_share, 4),
        train_rows=len(prepared.datasets["train"]),
        validation_rows=len(eval_set) if eval_set is not None else 0,
        trainable_parameters=trainable,
        memory=peak_memory(),
        processes=launch.procs.world_size,
        effective_batch_size=ranks.effective_batch_size(*launch.batch),
        packed=launch.packed,
        strategy=launch.strategy,
        method=recipe.adapter.method,
        total_parameters=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
        **measured,
    )


def _save_adapter(trainer: Any, tokenizer: Any, run: RunDir, recipe: Recipe, *, gathered: bool = False) -> None:
    if gathered:  # FSDP / ZeRO-3: the adapter was gathered into the build folder by every process together
        build = run.adapter_build
        tokenizer.save_pretrained(build)
    else:  # a build folder a killed process left is started anew
        build = adapter_build_dir(run)
        save_artifact(recipe, trainer, tokenizer, build, run.root)
    replace_dir_atomic(build, run.root / artifact_name(recipe))


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
