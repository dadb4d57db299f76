"""`train(recipe)`: one recipe in, one trained adapter out. Reads top to bottom, one numbered step at a time."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.config import Recipe
from lora_tune.run_dir import RunDir, replace_dir_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced and measured; also written to `summary.json` in the run directory."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_seen: int | None
    trained_token_share: float | None
    train_rows: int
    validation_rows: int
    trainable_parameters: int
    quantized_layers: int
    wall_seconds: float
    memory: dict[str, float] = field(default_factory=dict)
    loss_plot: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    recipe_path: str | None = None,
    overrides: Sequence[str] = (),
) -> RunResult:
    """Train the recipe's adapter; return where it is and the key numbers. `resume` continues the run in output_dir
    from its newest complete checkpoint (see `lora_tune.resume`)."""
    started = time.monotonic()
    _quiet_third_party_noise()
    from lora_tune.adapters import build_peft_config
    from lora_tune.check import PREFLIGHT_FILE, preflight
    from lora_tune.checkpoints import checkpoint_callback
    from lora_tune.data import build_datasets
    from lora_tune.faults import check_free_disk, translate_faults
    from lora_tune.metrics import compact_progress_callback, metrics_callback, peak_memory, plot_loss, read_metrics
    from lora_tune.modeling import load_model, load_tokenizer, resolve_dtype
    from lora_tune.resume import open_run, resume_hint
    from lora_tune.signals import StopRequest, graceful_stop, raise_if_stopped, stop_callback
    from lora_tune.trl_args import to_sft_config

    # 1. Run directory: refuse to clobber another run; on resume, check the recipe and data are unchanged and find
    #    the newest complete checkpoint; record the resolved recipe and environment first, so a crash is traceable.
    run, start = open_run(recipe, overwrite=overwrite, resume=resume, recipe_path=recipe_path)
    hint, stop = resume_hint(recipe_path, overrides), StopRequest()

    # 2. Tokenizer. From here to step 4, everything that can fail on the user's data fails before the model loads.
    tokenizer = load_tokenizer(recipe.model)

    # 3. Pre-flight check on a sample of the data: each assistant turn trains a stop token the generation config
    #    stops on, masks are sane, the template saved with the adapter is the one used here. Writes preflight.json;
    #    a failed check stops the run (exit 2) unless the recipe sets preflight.on_failure: warn.
    preflight(recipe, tokenizer, run.root / PREFLIGHT_FILE)

    # 4. Data: tokenized, assistant-masked train (and validation) splits.
    prepared = build_datasets(recipe, tokenizer)
    log.info("data: %s", prepared.stats.summary().replace("\n", "; "))
    train_set = prepared.datasets["train"]
    eval_set = prepared.datasets.get("validation")
    from lora_tune.data.packing import log_batching  # padding fraction, packed and padded

    log_batching(recipe, [len(ids) for ids in train_set["input_ids"]], on_gpu=_on_gpu())

    # 5. Base model, 4-bit/8-bit when the recipe quantizes, prepared for k-bit training.
    import transformers
    from trl import SFTTrainer

    transformers.set_seed(recipe.training.seed)
    model = load_model(recipe.model, recipe.quantization, recipe.training)
    quantized_layers = count_quantized_layers(model)

    # 6. Trainer: TRL does the loop; peft wraps the model with the recipe's adapter.
    dtype = resolve_dtype(recipe.model.dtype)
    trainer = SFTTrainer(
        model=model,
        args=to_sft_config(recipe, run.checkpoints, dtype),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=build_peft_config(recipe.adapter),
        callbacks=[metrics_callback(run.metrics)]
        + [checkpoint_callback(run.checkpoints, recipe.training.save_total_limit), stop_callback(stop)],
    )
    check_free_disk(run.root, recipe, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    _use_compact_progress(trainer, compact_progress_callback())

    # 7. Train (from the checkpoint when resuming). SIGTERM/SIGINT save a checkpoint and stop; out-of-memory and a
    #    full disk become one line naming the last complete checkpoint.
    with graceful_stop(stop), translate_faults(recipe, run.checkpoints, hint):
        output = trainer.train(resume_from_checkpoint=str(start.checkpoint) if start.checkpoint else None)
    raise_if_stopped(stop, trainer.state.global_step, str(run.checkpoints), hint)

    # 8. Evaluate once more at the end, when there is validation data.
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    # 9. Save the adapter (with the tokenizer and its chat template) atomically, on the main process only.
    if trainer.is_world_process_zero():
        with translate_faults(recipe, run.checkpoints, hint):
            _save_adapter(trainer, tokenizer, run)

    # 10. Summary: metrics file, loss curve, summary.json.
    records = read_metrics(run.metrics)
    result = RunResult(
        run_dir=run.root,
        adapter_dir=run.adapter,
        steps=output.global_step,
        train_loss=_last(records, "loss"),
        eval_loss=eval_loss,
        tokens_seen=_last(records, "num_tokens"),
        trained_token_share=round(prepared.stats.train.trained_share, 4),
        train_rows=len(train_set),
        validation_rows=len(eval_set) if eval_set is not None else 0,
        trainable_parameters=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        quantized_layers=quantized_layers,
        wall_seconds=round(time.monotonic() - started, 1),
        memory=peak_memory(),
    )
    if trainer.is_world_process_zero():
        result.loss_plot = plot_loss(records, run.loss_plot, title=f"{Path(recipe.output_dir).name}: loss")
        write_json_atomic(run.summary, result.to_json())
    return result


def count_quantized_layers(model: Any) -> int:
    """bitsandbytes 4-bit and 8-bit linear layers in the model: evidence that the base really is quantized."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _save_adapter(trainer: Any, tokenizer: Any, run: RunDir) -> None:
    build = run.root / ".adapter.tmp"
    trainer.model.save_pretrained(build)
    tokenizer.save_pretrained(build)
    replace_dir_atomic(build, run.adapter)


def _use_compact_progress(trainer: Any, compact: type) -> None:
    from transformers.trainer_callback import ProgressCallback

    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(compact)


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _last(records: list[dict[str, Any]], key: str) -> Any:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def _quiet_third_party_noise() -> None:
    """bitsandbytes logs a harmless fallback notice on the CPU; users should not mistake it for a failure."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
