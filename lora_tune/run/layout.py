"""The run directory's layout, and writes that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError
from lora_tune.run.locks import acquire, release


class RunDirError(LoraTuneError):
    """The output directory cannot be used without losing something."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def adapter(self) -> Path:
        """Standard PEFT adapter folder, with the tokenizer (and its chat template) saved beside it."""
        return self.root / ADAPTER_DIR

    @property
    def adapter_build(self) -> Path:
        """Where the adapter is written before it replaces adapter/ in one rename (replace_dir_atomic)."""
        return self.root / f".{ADAPTER_DIR}.tmp"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def prepared_data(self) -> Path:
        return self.root / PREPARED_DATA_DIR

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT

    def is_run(self) -> bool:
        return self.recipe.is_file()


MARKER = ".lora-tune-run"  # written when a run starts: the proof that lora-tune made this directory
LOCK = ".lora-tune.lock"  # held by the process that trains into the directory (lora_tune.run.locks)
# The names of a run directory's files, here only; the modules that write them import them from here.
RECIPE_FILE = "recipe.yaml"
ENVIRONMENT_FILE = "environment.jsonl"  # one record per attempt (provenance)
DATA_FINGERPRINT = "data_fingerprint.json"  # the data a resume must find unchanged
LINEAGE_FILE = "lineage.json"  # where the run starts from (sequential fine-tuning)
PREFLIGHT_FILE = "preflight.json"  # the pre-flight check's report
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOSS_PLOT = "loss.png"
TEST_SPLIT = "test.jsonl"  # the held-out split `lora-tune eval` reads
EVAL_JSON, EVAL_MARKDOWN = "eval.json", "eval.md"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
LABELS_FILE = "labels.json"  # a classification run's label names, inside its adapter/ or model/
MODEL_DIR = "model"  # what partial and full fine-tuning save instead of adapter/
PISSA_INIT_DIR = "adapter_init"  # the un-trained PiSSA/OLoRA adapter, needed to save the trained one as plain LoRA
PREPARED_DATA_DIR = ".prepared-data"  # the main process's tokenized data, for the other processes
PREPARED_STATS = "stats.json"  # inside it, written last: the copy is complete
# Every top-level name a run writes (its marker and lock included). `--overwrite` removes these and nothing else;
# a directory with anything more refuses. tests/unit/run/test_layout.py tests the rules; the e2e runs
# (test_train_qlora, test_methods, test_evaluation) check that real runs write nothing outside the list.
RUN_ENTRIES = frozenset(
    {
        MARKER,
        LOCK,
        RECIPE_FILE,
        ENVIRONMENT_FILE,
        DATA_FINGERPRINT,
        LINEAGE_FILE,
        PREFLIGHT_FILE,
        METRICS_FILE,
        SUMMARY_FILE,
        LOSS_PLOT,
        TEST_SPLIT,
        EVAL_JSON,
        EVAL_MARKDOWN,
        CHECKPOINTS_DIR,
        ADAPTER_DIR,
        PISSA_INIT_DIR,
        MODEL_DIR,
        *(f".{name}.{end}" for name in (ADAPTER_DIR, MODEL_DIR) for end in ("tmp", "old")),  # their atomic swaps
        PREPARED_DATA_DIR,
    }
)
WRITE_PROBE = ".lora-tune-write-check."  # ensure_writable's file, removed at once (a kill may leave one)
_HELD: dict[Path, Any] = {}  # run directory -> the lock this process holds on it


def ensure_writable(folder: Path, what: str) -> None:
    """Refuse, in one line and before any work, a folder this command could not write its results into: a file is
    created and removed there (a permission check alone would pass for root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=WRITE_PROBE)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(
            f"{what}: '{folder}' is not writable ({exc.strerror or type(exc).__name__}); choose a folder you can "
            "write to"
        ) from None


def make_dir(folder: Path, what: str) -> None:
    """mkdir -p, failing in one line (a read-only or forbidden parent) instead of with a raw OSError."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"{what}: cannot create '{folder}' ({exc.strerror or type(exc).__name__})") from None
    ensure_writable(folder, what)


def foreign_entries(root: Path) -> list[str]:
    """Top-level names in `root` that no lora-tune run writes (a half-written `.NAME.xxx.tmp` of ours counts as
    ours)."""
    return sorted(p.name for p in root.iterdir() if not _ours(p.name))


def _ours(name: str) -> bool:
    if name in RUN_ENTRIES or name.startswith(WRITE_PROBE):
        return True
    if name.startswith(".") and name.endswith(".tmp"):  # write_text_atomic's temporary: .recipe.yaml.x1y2.tmp
        return name[1:].split(".tmp")[0].rsplit(".", 1)[0] in RUN_ENTRIES
    return False


def is_lora_tune_run(run: RunDir) -> bool:
    """Made by lora-tune: its marker, or (a run from before the marker) recipe.yaml and only names runs write."""
    if (run.root / MARKER).is_file():
        return True
    return run.recipe.is_file() and not foreign_entries(run.root)


def prepare_run_dir(root: str | Path, *, overwrite: bool, resume: bool = False) -> RunDir:
    """Create the run directory and lock it for this process (release_run_dir lets go); refuse to write into another
    run (unless overwrite or resume) or into a directory lora-tune did not make. --overwrite removes only what a run
    writes, and refuses when anything else is there."""
    run = RunDir(Path(root))
    if overwrite and resume:
        raise RunDirError("--overwrite and resume exclude each other: replace the run, or continue it")
    if run.root.exists() and not run.root.is_dir():
        raise RunDirError(f"output_dir: '{run.root}' is a file, expected a directory")
    if run.root.is_dir() and any(run.root.iterdir()):
        if not is_lora_tune_run(run):
            raise RunDirError(
                f"output_dir: '{run.root}' is not empty and holds no lora-tune run "
                f"({_listing(foreign_entries(run.root))}); choose an empty or new directory"
            )
        ensure_writable(run.root, "output_dir")
        _lock(run)
        if not resume:
            _clear_for_overwrite(run, overwrite)
    else:
        make_dir(run.root, "output_dir")
        _lock(run)
    (run.root / MARKER).write_text("lora-tune run directory: --overwrite removes only what lora-tune wrote\n")
    return run


def _clear_for_overwrite(run: RunDir, overwrite: bool) -> None:
    if not overwrite:
        release_run_dir(run)
        raise RunDirError(
            f"output_dir: '{run.root}' already holds a run; pass --resume to continue it, --overwrite to "
            f"replace it, or set output_dir=runs/another-name"
        )
    foreign = foreign_entries(run.root)
    if foreign:
        release_run_dir(run)
        raise RunDirError(
            f"output_dir: '{run.root}' holds files lora-tune did not write ({_listing(foreign)}); --overwrite "
            "removes only a run's own files: move these away or choose another output_dir (nothing was deleted)"
        )
    for entry in run.root.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _lock(run: RunDir) -> None:
    key = run.root.resolve()
    if key not in _HELD:
        _HELD[key] = acquire(run.root / LOCK, f"output_dir '{run.root}'")


def release_run_dir(run: RunDir) -> None:
    """Let go of the run directory's lock (the process's exit does it too)."""
    lock = _HELD.pop(run.root.resolve(), None)
    if lock is not None:
        release(lock)


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


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def replace_dir_atomic(build: Path, target: Path) -> None:
    """Move a fully written directory into place; an older one at `target` is removed only after that succeeds."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():  # left by a process killed between the two renames below; target is then the newer one
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(build, target)
    shutil.rmtree(old, ignore_errors=True)
