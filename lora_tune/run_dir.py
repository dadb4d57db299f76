"""The run directory's layout, and writes that never leave a half-written file behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError


class RunDirError(LoraTuneError):
    """The output directory cannot be used without losing something."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def adapter(self) -> Path:
        """Standard PEFT adapter folder, with the tokenizer (and its chat template) saved beside it."""
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    def is_run(self) -> bool:
        return self.recipe.is_file()


def prepare_run_dir(root: str | Path, *, overwrite: bool, resume: bool = False) -> RunDir:
    """Create the run directory; refuse to write into another run (unless overwrite or resume) or foreign files."""
    run = RunDir(Path(root))
    if overwrite and resume:
        raise RunDirError("--overwrite and resume exclude each other: replace the run, or continue it")
    if run.root.exists() and not run.root.is_dir():
        raise RunDirError(f"output_dir: '{run.root}' is a file, expected a directory")
    if run.root.is_dir() and any(run.root.iterdir()):
        if not run.is_run():
            raise RunDirError(
                f"output_dir: '{run.root}' is not empty and holds no lora-tune run; choose an empty or new directory"
            )
        if resume:
            return run
        if not overwrite:
            raise RunDirError(
                f"output_dir: '{run.root}' already holds a run; pass --resume to continue it, --overwrite to "
                f"replace it, or set output_dir=runs/another-name"
            )
        shutil.rmtree(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    return run


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same directory, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def replace_dir_atomic(build: Path, target: Path) -> None:
    """Move a fully written directory into place; an older one at `target` is removed only after that succeeds."""
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(build, target)
    shutil.rmtree(old, ignore_errors=True)
