"""`train(recipe)`: one recipe in, one trained adapter out. Reads top to bottom, one numbered step at a time."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.config import Recipe
from lora_tune.recipe import dump_resolved
from lora_tune.run_dir import RunDir, prepare_run_dir, replace_dir_atomic, write_json_atomic, write_text_atomic

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
    method: str = "lora"
    total_parameters: int = 0
    trainable_percent: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def train(recipe: Recipe, *, overwrite: bool = False) -> RunResult:
    """Train the recipe's adapter; return where it is and the key numbers."""
    started = time.monotonic()
    _quiet_third_party_noise()
    if recipe.task.type == "classification":
        from lora_tune.classification import train_classifier

        return train_classifier(recipe, overwrite=overwrite)
    from lora_tune.check import PREFLIGHT_FILE, preflight
    from lora_tune.data import build_datasets
    from lora_tune.methods import runtime as methods
    from lora_tune.metrics import compact_progress_callback, metrics_callback, peak_memory, plot_loss, read_metrics
    from lora_tune.modeling import load_model, load_tokenizer, resolve_dtype
    from lora_tune.trl_args import to_sft_config

    # 1. Run directory: refuse to clobber another run; record the resolved recipe first, so a crash is traceable.
    run = prepare_run_dir(recipe.output_dir, overwrite=overwrite)
    write_text_atomic(run.recipe, dump_resolved(recipe))
    write_json_atomic(run.root / methods.LINEAGE_FILE, methods.lineage(recipe))

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
    model, peft_config = methods.prepare_model(recipe, model)  # frozen/unfrozen, or an adapter config to apply

    # 6. Trainer: TRL does the loop; peft wraps the model with the recipe's adapter.
    dtype = resolve_dtype(recipe.model.dtype)
    trainer = SFTTrainer(
        model=model,
        args=to_sft_config(recipe, run.checkpoints, dtype),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[metrics_callback(run.metrics)],
    )
    methods.attach(recipe, trainer, run.root)  # LoRA+ optimizer, AdaLoRA budget, PiSSA/LoftQ initialisation
    _use_compact_progress(trainer, compact_progress_callback())

    # 7. Train.
    output = trainer.train()

    # 8. Evaluate once more at the end, when there is validation data.
    eval_loss = trainer.evaluate()["eval_loss"] if eval_set is not None else None

    # 9. Save the adapter (with the tokenizer and its chat template) atomically, on the main process only.
    if trainer.is_world_process_zero():
        _save_adapter(trainer, tokenizer, run, recipe)

    # 10. Summary: metrics file, loss curve, summary.json.
    records = read_metrics(run.metrics)
    trainable, total = methods.parameter_counts(trainer.model)
    result = RunResult(
        run_dir=run.root,
        adapter_dir=run.root / methods.artifact_name(recipe),
        steps=output.global_step,
        train_loss=_last(records, "loss"),
        eval_loss=eval_loss,
        tokens_seen=_last(records, "num_tokens"),
        trained_token_share=round(prepared.stats.train.trained_share, 4),
        train_rows=len(train_set),
        validation_rows=len(eval_set) if eval_set is not None else 0,
        trainable_parameters=trainable,
        quantized_layers=quantized_layers,
        wall_seconds=round(time.monotonic() - started, 1),
        memory=peak_memory(),
        method=recipe.adapter.method,
        total_parameters=total,
        trainable_percent=round(100 * trainable / max(total, 1), 4),
    )
    log.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, result.trainable_percent)
    if trainer.is_world_process_zero():
        result.loss_plot = plot_loss(records, run.loss_plot, title=f"{Path(recipe.output_dir).name}: loss")
        write_json_atomic(run.summary, result.to_json())
    return result


def count_quantized_layers(model: Any) -> int:
    """bitsandbytes 4-bit and 8-bit linear layers in the model: evidence that the base really is quantized."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _save_adapter(trainer: Any, tokenizer: Any, run: RunDir, recipe: Recipe) -> None:
    from lora_tune.methods.runtime import artifact_name, save_artifact

    build = run.root / ".adapter.tmp"
    save_artifact(recipe, trainer, tokenizer, build, run.root)
    replace_dir_atomic(build, run.root / artifact_name(recipe))


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
