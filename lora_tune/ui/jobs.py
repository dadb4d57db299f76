"""The `lora-tune` commands the page starts, as child processes: the same command a terminal runs, so a run
started here is an ordinary run (its folder, its lock, its checkpoints) and outlives the page and the UI.

A training run's console goes to a log file under the runs folder (`.lora-tune-ui/`, never inside a run directory,
whose entries lora-tune owns); short commands (eval, merge, export, push --dry-run) are awaited and their output
returned. A failure is shown as the command's own one-line error.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_tune.run.layout import RunDir
from lora_tune.run.locks import LockedError
from lora_tune.ui.runs import holder_pid

LOG_FOLDER = ".lora-tune-ui"
TAIL_BYTES = 64 * 1024


def command(*args: str) -> list[str]:
    """`lora-tune ARGS` as this interpreter runs it (the venv's, whatever PATH says)."""
    return [sys.executable, "-m", "lora_tune", *args]


def child_env() -> dict[str, str]:
    """The UI's environment (a hub token in it reaches the push, and only there) with unbuffered output, so the
    log follows the run line by line."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def one_line_error(output: str) -> str:
    """The command's error line (`error: ...`), else its last line."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or "] error:" in line]
    return errors[-1] if errors else (lines[-1] if lines else "the command failed without a message")


@dataclass
class Result:
    code: int
    output: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def error(self) -> str:
        return one_line_error(self.output)


async def run_command(*args: str, cwd: Path | None = None) -> Result:
    """Run `lora-tune ARGS` to its end; its stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        *command(*args),
        cwd=cwd,
        env=child_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    return Result(process.returncode or 0, out.decode("utf-8", "replace"))


class Trainings:
    """Training runs started from the page: `lora-tune train RECIPE [--resume | --overwrite]` in its own session
    (closing the page or stopping the UI does not stop it), console to a log file per run directory."""

    def __init__(self, runs_folder: Path, cwd: Path) -> None:
        self.logs = runs_folder / LOG_FOLDER
        self.cwd = cwd
        self.children: dict[Path, subprocess.Popen] = {}

    def log_path(self, run_dir: Path) -> Path:
        key = hashlib.sha1(str(self._absolute(run_dir)).encode()).hexdigest()[:10]
        return self.logs / f"{run_dir.name}-{key}.log"

    def _absolute(self, run_dir: Path) -> Path:
        return (self.cwd / run_dir).resolve()

    def start(self, recipe: Path, run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> subprocess.Popen:
        """Start training; a live run in `run_dir` is refused here with the lock's own line (the command would
        refuse it too, but its log must not be appended to)."""
        run = RunDir(self._absolute(run_dir))
        pid = holder_pid(run)
        if pid is not None:
            holder = (run.root / ".lora-tune.lock").read_text(encoding="utf-8", errors="replace").strip()
            raise LockedError("output_dir", f"'{run_dir}' is in use by another lora-tune process ({holder})")
        args = ["train", str(recipe), *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])]
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.log_path(run_dir)
        with log.open("a", encoding="utf-8") as handle:  # a new start appends: an earlier attempt's log stays
            handle.write(f"$ lora-tune {' '.join(args)}\n")
            handle.flush()
            child = subprocess.Popen(
                command(*args),
                cwd=self.cwd,
                env=child_env(),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[run.root] = child
        return child

    def exit_code(self, run_dir: Path) -> int | None:
        """The exit status of the child this UI started for `run_dir`, None while it runs or when unknown."""
        for child in self.children.values():  # reap every finished child, not only this one
            child.poll()
        child = self.children.get(self._absolute(run_dir))
        return None if child is None else child.poll()

    def stop(self, run_dir: Path) -> int | None:
        """SIGTERM to the process holding the run's lock (from this page or a terminal): it finishes the step,
        writes a checkpoint and exits. Returns the pid signalled, None when no run is live there."""
        pid = holder_pid(RunDir(self._absolute(run_dir)))
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        return pid

    def tail(self, run_dir: Path, lines: int = 40) -> str:
        """The last lines of the run's log (progress bars' carriage returns become lines)."""
        try:
            with self.log_path(run_dir).open("rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(handle.tell() - TAIL_BYTES, 0))
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return ""
        rows = [row.rstrip() for row in text.replace("\r", "\n").splitlines() if row.strip()]
        return "\n".join(rows[-lines:])
