"""Training metrics: a JSONL log written as training goes, the loss curve as a PNG, peak memory."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any


def metrics_callback(path: Path) -> Any:
    """A transformers TrainerCallback that appends every log record (loss, lr, eval loss...) to `path` as JSON."""
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
            if not logs or not state.is_world_process_zero:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **_finite(logs)}
            if isinstance(logs.get("eval_loss"), (int, float)):
                record["eval_perplexity"] = _finite({"p": perplexity(logs["eval_loss"])})["p"]
            with path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    return JsonlMetrics()


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf beyond what a float holds."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def _finite(logs: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: keep such values as strings so the file stays valid JSON."""
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in logs.items()}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def last_value(records: list[dict[str, Any]], key: str) -> Any:
    """The last numeric value of `key` in the training log's records, or None."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def plot_loss(records: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Train (and eval) loss against step, as a PNG. None when nothing was logged."""
    return plot_series(records, out, title, "loss", [("loss", "train loss"), ("eval_loss", "eval loss")])


def plot_series(
    records: list[dict[str, Any]], out: Path, title: str, ylabel: str, series: list[tuple[str, str]]
) -> Path | None:
    """Each (metrics key, label) of `series` against step, as a PNG (an `eval_` key with markers: evaluations are
    sparse). None when none of them was logged."""
    lines = [
        (label, key, [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))])
        for key, label in series
    ]
    lines = [line for line in lines if line[2]]
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, key, points in lines:
        ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval_") else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.plot.tmp")  # the shape of write_text_atomic's temporaries: a run's own name
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out


def peak_memory() -> dict[str, float]:
    """Peak GPU memory allocated by torch (GiB), and the process's peak resident memory (GiB)."""
    import torch

    out: dict[str, float] = {}
    if torch.cuda.is_available():
        out["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["cpu_peak_rss_gib"] = round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)
    except ImportError:  # Windows
        pass
    return out


def format_log_line(logs: dict[str, Any], step: int, max_steps: int) -> str | None:
    """One short console line per log record (the full record goes to metrics.jsonl)."""
    if "eval_loss" in logs:
        loss = logs["eval_loss"]
        return f"  eval  step {step}/{max_steps}: loss {loss:.4f}  perplexity {perplexity(loss):.3g}"
    if "loss" not in logs:
        return None  # the trainer's closing runtime record: the summary reports it
    parts = [f"  train step {step}/{max_steps}", f"loss {logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    if "grad_norm" in logs:
        parts.append(f"grad norm {logs['grad_norm']:.3f}")
    if "mean_token_accuracy" in logs:
        parts.append(f"token acc {logs['mean_token_accuracy']:.3f}")
    return "  ".join(parts)


def compact_progress_callback() -> Any:
    """transformers' progress bar, writing a short line per log step instead of the raw log dict."""
    from transformers.trainer_callback import ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
            if state.is_world_process_zero and self.training_bar is not None and logs:
                line = format_log_line(logs, state.global_step, state.max_steps)
                if line:
                    self.training_bar.write(line)

    return CompactProgress


def quiet_third_party_noise() -> None:
    """bitsandbytes logs a harmless fallback notice on the CPU; users should not mistake it for a failure."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def use_compact_progress(trainer: Any) -> None:
    """Swap transformers' progress bar for the compact one (a short line per log step)."""
    from transformers.trainer_callback import ProgressCallback

    if trainer.callback_handler.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(compact_progress_callback())
