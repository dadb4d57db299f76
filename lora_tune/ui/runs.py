"""The runs under a folder, as lora-tune leaves them: found by their marker, live while their lock is held, with
their metrics read from metrics.jsonl. Whoever started a run (this page or a terminal), it reads the same.

Reading a lock never takes it: the holder's pid is in the lock file's text (lora_tune.run.locks), and a pid that
still runs on this host means the run is live. Taking the lock to test it would refuse a real start for a moment.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.run.layout import LOCK, MARKER, RunDir

HOLDER = re.compile(r"^pid (\d+) on (\S+),")
LOG_STEP = re.compile(r"step (\d+)/(\d+)")
CHART_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm", "reward")  # what the Train charts draw


@dataclass
class RunInfo:
    root: Path
    status: str  # running | finished | stopped | failed
    pid: int | None
    step: int | None
    loss: float | None
    eval_loss: float | None
    updated: float
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name


def find_runs(folder: Path, depth: int = 2) -> list[RunDir]:
    """Run directories under `folder` (itself included), newest first; `depth` levels down."""
    found: list[RunDir] = []

    def visit(path: Path, level: int) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        if any(e.name == MARKER for e in entries) or any(e.name == "recipe.yaml" for e in entries):
            found.append(RunDir(path))
            return
        if level < depth:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
                    visit(Path(entry.path), level + 1)

    visit(folder, 0)
    return sorted(found, key=lambda run: _mtime(run.root), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def holder_pid(run: RunDir) -> int | None:
    """The pid of the live process that holds the run's lock, else None."""
    try:
        text = (run.root / LOCK).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    match = HOLDER.match(text)
    if not match or match[2] != socket.gethostname():
        return None
    pid = int(match[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's live process
        return pid
    return pid


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record of metrics.jsonl; a line still being written is left for the next read."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key`, in order; a resumed run's repeated steps keep the newest value."""
    points: dict[int, float] = {}
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, (int, float)) and isinstance(step, int):
            points[step] = float(value)
    return sorted(points.items())


def read_summary(run: RunDir) -> dict[str, Any]:
    try:
        data = json.loads(run.summary.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def has_checkpoint(run: RunDir) -> bool:
    try:
        return any(p.name.startswith("checkpoint-") for p in run.checkpoints.iterdir())
    except OSError:
        return False


def run_info(run: RunDir) -> RunInfo:
    pid = holder_pid(run)
    summary = read_summary(run)
    records = read_metrics(run.metrics)
    losses, evals = series(records, "loss"), series(records, "eval_loss")
    if pid is not None:
        status = "running"
    elif summary:
        status = "finished"
    elif has_checkpoint(run):
        status = "stopped"
    else:
        status = "failed"
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    return RunInfo(
        root=run.root,
        status=status,
        pid=pid,
        step=summary.get("steps") or (max(steps) if steps else None),
        loss=summary.get("train_loss")
        if summary.get("train_loss") is not None
        else (losses[-1][1] if losses else None),
        eval_loss=summary.get("eval_loss")
        if summary.get("eval_loss") is not None
        else (evals[-1][1] if evals else None),
        updated=max(_mtime(run.root), _mtime(run.metrics)),
        summary=summary,
    )


def total_steps(run: RunDir, log_text: str = "") -> int | None:
    """The run's planned optimizer steps: from its console log (`train step 12/40`), else from the newest
    checkpoint's trainer_state.json (a run started in a terminal has no log here)."""
    found = LOG_STEP.findall(log_text)
    if found:
        return int(found[-1][1])
    try:
        states = sorted(run.checkpoints.glob("checkpoint-*/trainer_state.json"), key=_mtime)
        return int(json.loads(states[-1].read_text(encoding="utf-8"))["max_steps"]) if states else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None


@dataclass
class Pace:
    """Steps per second, measured while the page watches (steps seen at two times)."""

    first: tuple[float, int] | None = None
    last: tuple[float, int] | None = None

    def see(self, step: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.first is None or step < self.first[1]:
            self.first = (now, step)
        if self.last is None or step != self.last[1]:
            self.last = (now, step)

    def seconds_left(self, total: int | None) -> float | None:
        if total is None or self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return None
        rate = (self.last[1] - self.first[1]) / max(self.last[0] - self.first[0], 1e-9)
        return max(total - self.last[1], 0) / rate


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m {seconds % 60:02d}s"
    )
