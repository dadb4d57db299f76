"""What a training run produced and measured (summary.json), and the step its saved adapter comes from."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.recipe.schema import Recipe


@dataclass
class RunResult:
    """What a run produced and measured; also written to `summary.json` in the run directory."""

    run_dir: Path
    adapter_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    train_rows: int
    validation_rows: int
    trainable_parameters: int
    quantized_layers: int
    wall_seconds: float
    tokens_seen: int | None = None
    trained_token_share: float | None = None  # SFT runs: the share of tokens the loss is computed on
    memory: dict[str, float] = field(default_factory=dict)
    loss_plot: Path | None = None
    best: dict[str, Any] | None = None  # with keep_best / early stopping: the step the saved adapter comes from
    processes: int = 1
    effective_batch_size: int | None = None  # per device x processes x gradient accumulation
    packed: bool = False  # the batch items are packed rows of several examples
    strategy: str = "ddp"
    replica_checksums: list[str] | None = None  # adapter checksum of every process (DDP / ZeRO-2 runs)
    method: str = "lora"
    total_parameters: int = 0
    trainable_percent: float = 0.0
    objective: str = "sft"
    reward_accuracy: float | None = None  # preference runs: held-out share of pairs whose chosen answer wins
    reward_margin: float | None = None  # preference runs: mean implicit reward of chosen minus rejected
    eval_accuracy: float | None = None  # classification runs: held-out accuracy of the head

    def parameter_share(self) -> tuple[int, int, float]:
        """(trainable, total, trainable percent), as the log line and the summary print them."""
        return self.trainable_parameters, self.total_parameters, self.trainable_percent

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def best_checkpoint(state: Any, recipe: Recipe, steps: int) -> dict[str, Any] | None:
    """With keep_best or early stopping: the step the saved adapter comes from, and whether training stopped early."""
    t = recipe.training
    if not t.keeps_best or state.best_global_step is None:
        return None
    planned = state.max_steps
    return {
        "step": state.best_global_step,
        "metric": f"eval_{t.best_metric}",
        "value": state.best_metric,
        "stopped_early": steps < planned,
        "planned_steps": planned,
    }
