"""`train(recipe)`: one recipe in, one trained adapter out. Reads top to bottom, one numbered step at a time."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
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
from lora_tune.model.dtype import keep_trainable_dtypes
from lora_tune.model.load import count_quantized_layers, load_model, load_tokenizer, resolve_dtype
from lora_tune.recipe.schema import Recipe
from lora_tune.recipe.strategy import SHARDED
from lora_tune.run.layout import RunDir, replace_dir_atomic, write_json_atomic
from lora_tune.training import distributed as dist
from lora_tune.training import processes as ranks
from lora_tune.training.checkpoints import checkpoint_callback
from lora_tune.training.divergence import Divergence, divergence_callback, raise_if_diverged
from lora_tune.training.faults import check_free_disk, translate_faults
from lora_tune.training.levers import apply_liger, check_levers, describe_levers
from lora_tune.training.log import (
    compact_progress_callback,
    last_value,
    metrics_callback,
    peak_memory,
    plot_loss,
    read_metrics,
)
from lora_tune.training.result import RunResult, best_checkpoint
from lora_tune.training.resume import (
    evaluation_keeps_rng,
    open_run,
    restore_token_count,
    resume_hint,
    resume_point_of,
    train_or_finish,
)
from lora_tune.training.signals import StopRequest, graceful_stop, raise_if_stopped, stop_callback
from lora_tune.training.trl_args import early_stopping_callbacks, to_sft_config

log = logging.getLogger(__name__)


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
    strategy = dist.resolve_strategy(recipe, procs)
    dtype = resolve_dtype(recipe.model.dtype)
    args = to_sft_config(recipe, RunDir(Path(recipe.output_dir)).checkpoints, dtype)
    batch = (recipe.training.batch_size, procs.world_size, recipe.training.gradient_accumulation_steps)
    packed = packing_plan(recipe).enabled  # batch items are packed rows of several examples
    main_first = ranks.MainFirst(procs)
    check_levers(recipe, _on_gpu())  # a lever that cannot run here (Liger on the CPU) fails before any work

    # 1. Run directory: refuse to clobber another run; on resume, check the recipe and data are unchanged and find
    #    the newest complete checkpoint; record the resolved recipe and environment first, so a crash is traceable.
    if procs.is_main:
        launch = ranks.batch_comment(*batch, strategy, packed=packed)
        run, start = open_run(recipe, overwrite=overwrite, resume=resume, recipe_path=recipe_path, comment=launch)
    else:  # the main process has checked the run and set broken checkpoints aside: only read where it resumes
        run = RunDir(Path(recipe.output_dir))
        start = resume_point_of(run, recipe, resume=resume, overwrite=overwrite)
    hint, stop, diverged = resume_hint(recipe_path, overrides), StopRequest(), Divergence()
    if procs.is_main:
        write_json_atomic(run.root / methods.LINEAGE_FILE, methods.lineage(recipe))

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
    log.info("%s (%s)", ranks.describe_batch(*batch, packed), strategy if procs.distributed else "one process")
    log.info("data: %s", prepared.stats.summary().replace("\n", "; "))
    if procs.is_main:
        write_test_split(prepared, run.root)
    train_set = prepared.datasets["train"]
    eval_set = prepared.datasets.get("validation")

    log_batching(recipe, [len(ids) for ids in train_set["input_ids"]], on_gpu=_on_gpu())

    # 5. Base model, 4-bit/8-bit when the recipe quantizes, prepared for k-bit training.
    import transformers
    from trl import SFTTrainer

    transformers.set_seed(recipe.training.seed)
    ranks.set_loading_environment(strategy, procs)
    model = load_model(recipe.model, recipe.quantization, recipe.training, strategy)
    quantized_layers = count_quantized_layers(model)
    model, peft_config = methods.prepare_model(recipe, model)  # frozen/unfrozen, or an adapter config to apply
    if recipe.training.liger:
        apply_liger(model)
    attention = use_varlen_attention(model, recipe, packed=packed)
    log.info("speed: %s", describe_levers(recipe, resolve_dtype(recipe.model.dtype), attention))

    # 6. Trainer: TRL does the loop; peft wraps the model with the recipe's adapter.
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[
            metrics_callback(run.metrics),
            *early_stopping_callbacks(recipe),
            checkpoint_callback(run.checkpoints, recipe.training.save_total_limit),
            stop_callback(stop),
            divergence_callback(diverged),  # last: it cancels a save the others asked for at a non-finite step
        ],
    )
    evaluation_keeps_rng(trainer)  # so a run resumed at an epoch's end shuffles the next epoch as the unbroken one
    methods.attach(recipe, trainer, run.root)  # LoRA+ optimizer, AdaLoRA budget, PiSSA/LoftQ initialisation
    keep_trainable_dtypes(trainer)  # a resumed QLoRA adapter trains in bfloat16 again, as before the kill
    check_free_disk(run.root, recipe, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    _use_compact_progress(trainer, compact_progress_callback())

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
    checksums = ranks.replica_checksums(trainer.model, procs, strategy)
    if strategy in SHARDED and procs.distributed:
        ranks.save_sharded_adapter(trainer, run.root / ".adapter.tmp")
    if trainer.is_world_process_zero():
        with translate_faults(recipe, run.checkpoints, hint):
            _save_adapter(trainer, tokenizer, run, recipe, gathered=strategy in SHARDED and procs.distributed)
    ranks.remove_prepared_data(run.root, procs)

    # 10. Summary: metrics file, loss curve, summary.json.
    records = read_metrics(run.metrics)
    trainable, total = methods.parameter_counts(trainer.model)
    result = RunResult(
        run_dir=run.root,
        adapter_dir=run.root / methods.artifact_name(recipe),
        steps=output.global_step,
        train_loss=last_value(records, "loss"),
        eval_loss=eval_loss,
        tokens_seen=last_value(records, "num_tokens"),
        trained_token_share=round(prepared.stats.train.trained_share, 4),
        train_rows=len(train_set),
        validation_rows=len(eval_set) if eval_set is not None else 0,
        trainable_parameters=trainable,
        quantized_layers=quantized_layers,
        wall_seconds=round(time.monotonic() - started, 1),
        memory=peak_memory(),
        best=best_checkpoint(trainer.state, recipe, output.global_step),
        processes=procs.world_size,
        effective_batch_size=ranks.effective_batch_size(*batch),
        packed=packed,
        strategy=strategy,
        replica_checksums=checksums,
        method=recipe.adapter.method,
        total_parameters=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
    )
    log.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, result.trainable_percent)
    if trainer.is_world_process_zero():
        result.loss_plot = plot_loss(records, run.loss_plot, title=f"{Path(recipe.output_dir).name}: loss")
        write_json_atomic(run.summary, result.to_json())
    return result


def _save_adapter(trainer: Any, tokenizer: Any, run: RunDir, recipe: Recipe, *, gathered: bool = False) -> None:
    build = run.root / ".adapter.tmp"
    if build.is_dir() and not gathered:  # left by a process killed while saving: start the folder anew
        shutil.rmtree(build)
    if gathered:  # FSDP / ZeRO-3: the adapter was gathered and written by every process together
        tokenizer.save_pretrained(build)
    else:
        save_artifact(recipe, trainer, tokenizer, build, run.root)
    replace_dir_atomic(build, run.root / artifact_name(recipe))


def _use_compact_progress(trainer: Any, compact: type) -> None:
    from transformers.trainer_callback import ProgressCallback

    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(compact)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
