"""The summary `lora-tune train` prints from a RunResult."""

from __future__ import annotations

from pathlib import Path

from lora_tune.training.result import RunResult, format_summary


def result(**changes) -> RunResult:  # noqa: ANN003 - RunResult fields
    fields = {
        "run_dir": Path("runs/x"),
        "adapter_dir": Path("runs/x/adapter"),
        "steps": 30,
        "train_loss": 1.23456,
        "eval_loss": None,
        "train_rows": 90,
        "validation_rows": 10,
        "trainable_parameters": 100,
        "quantized_layers": 0,
        "wall_seconds": 125.0,
    }
    return RunResult(**{**fields, **changes})


def test_the_summary_says_where_the_adapter_is_and_what_next():
    lines = format_summary(result()).splitlines()
    assert lines[1] == "Adapter saved to runs/x/adapter  (30 steps in 2m 05s)"
    assert lines[2] == "  train loss 1.2346   eval loss n/a"
    assert "  peak memory: n/a" in lines and f"  metrics: {Path('runs/x/metrics.jsonl')}" in lines
    assert lines[-3].startswith("  lora-tune eval runs/x --data ")


def test_the_best_checkpoint_and_the_batch_are_said_when_there_are_any():
    best = {"step": 20, "metric": "eval_loss", "value": 0.5, "stopped_early": True, "planned_steps": 50}
    text = format_summary(result(best=best, effective_batch_size=16, processes=2, packed=True))
    assert "  stopped early at step 30 of 50; adapter = best checkpoint, step 20 (eval_loss 0.5000)" in text
    assert "  effective batch 16 packed rows per optimizer step on 2 processes (ddp)" in text
    assert "best checkpoint" not in format_summary(result()) and "effective batch" not in format_summary(result())
