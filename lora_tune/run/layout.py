"""The run directory's layout: the name of every file a run writes (as `RunDir` properties), the run directory as an
output folder (locked by one process, replaced only where lora-tune wrote: lora_tune.run.outputs), and JSON writes
that never leave a half-written file behind."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.run import outputs
from lora_tune.run.locks import acquire, release
from lora_tune.run.outputs import OutputError, OutputKind, ensure_writable, make_dir, write_text_atomic


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

    @property
    def reward_plot(self) -> Path:
        return self.root / REWARD_PLOT

    @property
    def completions(self) -> Path:
        return self.root / COMPLETIONS_FILE

    @property
    def model(self) -> Path:
        """What partial and full fine-tuning save instead of adapter/: a whole transformers model folder."""
        return self.root / MODEL_DIR

    @property
    def pissa_init(self) -> Path:
        return self.root / PISSA_INIT_DIR

    @property
    def lineage(self) -> Path:
        return self.root / LINEAGE_FILE

    @property
    def preflight(self) -> Path:
        return self.root / PREFLIGHT_FILE

    @property
    def data_fingerprint(self) -> Path:
        return self.root / DATA_FINGERPRINT

    @property
    def environment(self) -> Path:
        return self.root / ENVIRONMENT_FILE

    @property
    def test_split(self) -> Path:
        return self.root / TEST_SPLIT

    def split(self, name: str) -> Path:
        """A held-out split saved in the run, by name (`test` is test.jsonl)."""
        return self.root / f"{name}.jsonl"

    @property
    def eval_json(self) -> Path:
        return self.root / EVAL_JSON

    @property
    def eval_markdown(self) -> Path:
        return self.root / EVAL_MARKDOWN

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
REWARD_PLOT = "reward.png"  # online RL runs: the rewards during training and at each evaluation
COMPLETIONS_FILE = "completions.jsonl"  # online RL runs: sampled completions with their rewards, at each log step
TEST_SPLIT = "test.jsonl"  # the held-out split `lora-tune eval` reads (RunDir.split("test"))
EVAL_JSON, EVAL_MARKDOWN = "eval.json", "eval.md"
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
LABELS_FILE = "labels.json"  # a classification run's label names, inside its adapter/ or model/
MODEL_DIR = "model"  # what partial and full fine-tuning save instead of adapter/
PISSA_INIT_DIR = "adapter_init"  # the un-trained PiSSA/OLoRA adapter, needed to save the trained one as plain LoRA
PREPARED_DATA_DIR = ".prepared-data"  # the main process's tokenized data, for the other processes
PREPARED_STATS = "stats.json"  # inside it, written last: the copy is complete
# Every top-level name a run writes (its marker and lock included). `--overwrite` removes these (and the run's
# marked build folders) and nothing else; a directory with anything more refuses. tests/unit/run/test_layout.py
# tests the rules; the e2e runs (test_train_qlora, test_methods, test_evaluation) check that real runs write
# nothing outside the list.
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
        REWARD_PLOT,
        COMPLETIONS_FILE,
        TEST_SPLIT,
        EVAL_JSON,
        EVAL_MARKDOWN,
        CHECKPOINTS_DIR,
        ADAPTER_DIR,
        PISSA_INIT_DIR,
        MODEL_DIR,
    }
)
# Build folders a run writes and renames or removes: .adapter.tmp, .model.tmp, the .adapter.old of a swap and the
# tokenized data for the other processes. They are lora-tune's by the marker inside (outputs.BUILD_MARKER); the
# names count only for telling a run from before the marker.
BUILD_ENTRIES = frozenset(
    {*(f".{name}.{end}" for name in (ADAPTER_DIR, MODEL_DIR) for end in ("tmp", "old")), PREPARED_DATA_DIR}
)
_HELD: dict[Path, Any] = {}  # run directory -> the lock this process holds on it


def _legacy_run(root: Path) -> bool:
    """A run from before the marker: its recipe.yaml, and only names runs write."""
    names = RUN_ENTRIES | BUILD_ENTRIES
    return (root / RECIPE_FILE).is_file() and all(entry.name in names for entry in root.iterdir())


# The run directory as an output folder (lora_tune.run.outputs): what `--overwrite` may remove. Its build folders
# (.adapter.tmp, .model.tmp, .prepared-data, the .adapter.old of a swap) are lora-tune's by their marker, not by name.
RUN = OutputKind("run directory", "output_dir", MARKER, fixed=RUN_ENTRIES, legacy=_legacy_run)


def foreign_entries(root: Path) -> list[str]:
    """Top-level names in the run directory `root` that no lora-tune run wrote."""
    return outputs.foreign_entries(root, RUN)


def is_lora_tune_run(run: RunDir) -> bool:
    """Made by lora-tune: its marker, or (a run from before the marker) recipe.yaml and only names runs write."""
    return (run.root / MARKER).is_file() or _legacy_run(run.root)


def prepare_run_dir(root: str | Path, *, overwrite: bool, resume: bool = False, reads: Iterable[Path] = ()) -> RunDir:
    """Create the run directory and lock it for this process (release_run_dir lets go); refuse to write into another
    run (unless overwrite or resume), into a directory lora-tune did not make, or into a folder the run reads
    (`reads`: the base model, when it is a local folder). --overwrite removes only what a run writes, and refuses
    when anything else is there."""
    run = RunDir(Path(root))
    if overwrite and resume:
        raise OutputError("overwrite", "replaces the run and resume continues it: they exclude each other; choose one")
    if run.root.exists() and not run.root.is_dir():
        raise OutputError("output_dir", f"'{run.root}' is a file, expected a directory")
    occupied = run.root.is_dir() and any(run.root.iterdir())
    if occupied and not is_lora_tune_run(run):
        outputs.refuse_foreign(run.root, RUN)  # not a run: refused, whatever the flags
    outputs.check_overlap(run.root, [path for path in reads if path.exists()], "output_dir")
    for name in sorted(BUILD_ENTRIES):  # a resume renames into these too: a folder of the user's there is refused now
        outputs.check_build_slot(run.root / name, "output_dir")
    if occupied:
        ensure_writable(run.root, "output_dir")
        _lock(run)
        if not resume:
            _clear_for_overwrite(run, overwrite)
    else:  # the marker first: a run killed at any point after this leaves a folder that is known as a run
        make_dir(run.root, "output_dir")
        outputs.record(run.root, RUN)
        _lock(run)
    outputs.record(run.root, RUN)
    return run


def _clear_for_overwrite(run: RunDir, overwrite: bool) -> None:
    if not overwrite:
        release_run_dir(run)
        raise OutputError(
            "output_dir",
            f"'{run.root}' already holds a run; pass --resume to continue it, --overwrite to replace it, or set "
            "output_dir=runs/another-name",
        )
    try:  # decided again under the lock: another process may have written there since
        outputs.remove_ours(run.root, RUN, keep=[LOCK, MARKER])
    except OutputError:
        release_run_dir(run)
        raise


def adapter_build_dir(run: RunDir) -> Path:
    """A fresh, marked .adapter.tmp for the artefact, renamed into place by replace_dir_atomic when complete."""
    return outputs.fresh_build_dir(run.adapter_build, "output_dir")


def _lock(run: RunDir) -> None:
    key = run.root.resolve()
    if key not in _HELD:
        _HELD[key] = acquire(run.root / LOCK, "output_dir", run.root)


def release_run_dir(run: RunDir) -> None:
    """Let go of the run directory's lock (the process's exit does it too)."""
    lock = _HELD.pop(run.root.resolve(), None)
    if lock is not None:
        release(lock)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read a MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
