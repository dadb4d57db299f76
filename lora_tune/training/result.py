"""What a training run produced and measured (summary.json), the step its saved adapter comes from, and the summary
`lora-tune train` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir


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
    train_reward: float | None = None  # online RL runs: the mean total reward of the last logged steps
    eval_reward: float | None = None  # online RL runs: the mean total reward on the validation prompts
    task_plot: Path | None = None  # a plot the task draws beside the loss curve (an RL run's reward.png)

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


def format_summary(result: RunResult) -> str:
    """What a finished run tells its user: where the adapter is, the losses, the best checkpoint, the batch, the data
    and memory figures, where the metrics are, and the commands to try the adapter next."""
    minutes, seconds = divmod(int(result.wall_seconds), 60)
    memory = ", ".join(f"{k.removesuffix('_gib').replace('_', ' ')} {v:.2f} GiB" for k, v in result.memory.items())
    share = f" ({result.trained_token_share:.0%} of them trained)" if result.trained_token_share is not None else ""
    tokens = f"{result.tokens_seen:,.0f}" if result.tokens_seen is not None else "n/a"
    lines = [
        "",
        f"Adapter saved to {result.adapter_dir}  ({result.steps} steps in {minutes}m {seconds:02d}s)",
        f"  train loss {_figure(result.train_loss)}   eval loss {_figure(result.eval_loss)}",
        *_reward_line(result),
        *_best_checkpoint_lines(result),
        *_batch_line(result),
        f"  rows: {result.train_rows} train, {result.validation_rows} validation;  tokens seen {tokens}{share}",
        f"  peak memory: {memory or 'n/a'}",
        f"  metrics: {RunDir(Path(result.run_dir)).metrics}"
        + (f";  loss curve: {result.loss_plot}" if result.loss_plot else "")
        + (f";  {result.task_plot}" if result.task_plot else ""),
        "Next:",
        f"  lora-tune eval {result.run_dir} --data YOUR_HELD_OUT.jsonl   # scores vs the base model: eval.md",
        f'  lora-tune chat {result.run_dir}                                 # or: lora-tune generate RUN "prompt"',
        f"  python -c \"from peft import AutoPeftModelForCausalLM as M; M.from_pretrained('{result.adapter_dir}')\"",
    ]
    return "\n".join(lines)


def _figure(value: float | None) -> str:
    return "n/a" if value is None else format(value, ".4f")


def _reward_line(result: RunResult) -> list[str]:
    if result.objective not in ("grpo", "rloo"):
        return []
    return [f"  train reward {_figure(result.train_reward)}   eval reward {_figure(result.eval_reward)}"]


def _best_checkpoint_lines(result: RunResult) -> list[str]:
    """With keep_best or early stopping: the step the saved adapter comes from."""
    best = result.best
    if not best:
        return []
    stopped = f"stopped early at step {result.steps} of {best['planned_steps']}; " if best["stopped_early"] else ""
    return [f"  {stopped}adapter = best checkpoint, step {best['step']} ({best['metric']} {best['value']:.4f})"]


def _batch_line(result: RunResult) -> list[str]:
    """The effective batch per optimizer step, and the processes that share it."""
    if not result.effective_batch_size:
        return []
    procs = f" on {result.processes} processes ({result.strategy})" if result.processes > 1 else ""
    unit = "packed rows" if result.packed else "examples"
    return [f"  effective batch {result.effective_batch_size} {unit} per optimizer step{procs}"]
