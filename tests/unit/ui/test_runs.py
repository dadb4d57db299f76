"""Runs as the page finds them: by their folders, live by their lock's holder, with their metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from lora_tune.run.layout import LOCK, MARKER, RunDir
from lora_tune.run.locks import acquire, release
from lora_tune.ui.runs import Pace, find_runs, format_seconds, holder_pid, read_metrics, run_info, series, total_steps


def make_run(root: Path, *, metrics: list[dict] | None = None, summary: dict | None = None) -> RunDir:
    root.mkdir(parents=True)
    (root / MARKER).write_text("")
    (root / "recipe.yaml").write_text("output_dir: x\n")
    if metrics is not None:
        (root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (root / "summary.json").write_text(json.dumps(summary))
    return RunDir(root)


def test_runs_are_found_by_their_marker_newest_first(tmp_path: Path) -> None:
    old = make_run(tmp_path / "a")
    new = make_run(tmp_path / "group" / "b")
    os.utime(old.root, (1, 1))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "notes.txt").write_text("mine")
    make_run(tmp_path / ".hidden" / "c")
    assert [run.root for run in find_runs(tmp_path)] == [new.root, old.root]


def test_a_live_lock_names_its_holder_and_a_dead_one_does_not(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    assert holder_pid(run) is None
    lock = acquire(run.root / LOCK, "output_dir", run.root)
    try:
        assert holder_pid(run) == os.getpid()
        assert run_info(run).status == "running"
    finally:
        release(lock)
    assert holder_pid(run) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run.root / LOCK).write_text(f"pid {dead.stdout.strip()} on {socket.gethostname()}, since 2026-01-01 00:00:00")
    assert holder_pid(run) is None  # left by a process that died
    (run.root / LOCK).write_text(f"pid {os.getpid()} on another-host, since 2026-01-01 00:00:00")
    assert holder_pid(run) is None  # a pid on another machine says nothing here


def test_status_and_figures(tmp_path: Path) -> None:
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}]
    stopped = make_run(tmp_path / "stopped", metrics=records)
    (stopped.checkpoints / "checkpoint-2").mkdir(parents=True)
    info = run_info(stopped)
    assert (info.status, info.step, info.loss, info.eval_loss) == ("stopped", 2, 2.5, 2.7)
    finished = make_run(tmp_path / "done", metrics=records, summary={"steps": 9, "train_loss": 1.5, "eval_loss": None})
    info = run_info(finished)
    assert (info.status, info.step, info.loss, info.eval_loss) == ("finished", 9, 1.5, 2.7)
    assert run_info(make_run(tmp_path / "failed")).status == "failed"


def test_metrics_skip_a_line_being_written_and_a_resume_keeps_the_newest_value(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 2.2}\n{"step": 3, "lo')
    records = read_metrics(path)
    assert len(records) == 3
    assert series(records, "loss") == [(1, 3.0), (2, 2.2)]
    assert series(records, "grad_norm") == []
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_total_steps_from_the_log_else_the_checkpoint(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    assert total_steps(run, "  train step 3/40  loss 1.0\n  train step 4/40") == 40
    assert total_steps(run) is None
    state = run.checkpoints / "checkpoint-5" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"max_steps": 25, "global_step": 5}))
    assert total_steps(run) == 25


def test_time_left_from_the_pace_seen() -> None:
    pace = Pace()
    assert pace.seconds_left(100) is None
    pace.see(10, now=0.0)
    pace.see(20, now=5.0)  # 2 steps a second
    assert pace.seconds_left(100) == 40.0
    assert pace.seconds_left(None) is None
    assert format_seconds(40.0) == "0m 40s" and format_seconds(3725) == "1h 02m" and format_seconds(None) == "unknown"
