"""Resuming a run: may it be continued (recipe and data unchanged), from which sealed checkpoint, and what makes the
continued run equal the uninterrupted one (the trained-token count carried over, evaluations that leave the random
generators as they found them).

Resuming picks the newest checkpoint whose manifest matches its files (see `lora_tune.training.checkpoints`) and
says which ones it skipped and why; the run's provenance is recorded at the start of every attempt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from lora_tune.errors import LoraTuneError
from lora_tune.recipe.load import dump_resolved
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import (
    RunDir,
    sha256_file,
    write_text_atomic,
)
from lora_tune.training.checkpoints import ResumePoint, find_resume_point, set_aside

log = logging.getLogger(__name__)


# Keys a resumed run may change: they steer logging, evaluation and saving, not what is learned.
FREE_KEYS = {
    "output_dir",
    "training.logging_steps",
    "training.eval_strategy",
    "training.eval_steps",
    "training.eval_batch_size",
    "training.save_strategy",
    "training.save_steps",
    "training.save_total_limit",
    "training.report_to",
    "training.resume",
    "training.gradient_checkpointing",  # recomputes the same activations: memory, not numbers
}
FREE_PREFIXES = ("preflight.", "eval_datasets")
# Keys that may grow (train longer); the learning-rate schedule is then stretched to the new length.
GROWABLE_KEYS = {"training.max_steps", "training.num_epochs"}


class ResumeError(LoraTuneError):
    """Resuming would be wrong (the recipe or the data changed) or there is nothing to resume."""


# ---------------------------------------------------------------------------------------------- recipe changes


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "l": [{"x": 2}]} -> {"a.b": 1, "l[0].x": 2}."""
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
        return out
    return {prefix: data}


def recipe_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(blocking, harmless) descriptions of what differs between the saved recipe and the new one."""
    before, after = flatten(old), flatten(new)
    blocking, harmless = [], []
    batch_keys = _same_effective_batch(before, after)
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "<unset>"), after.get(key, "<unset>")
        if a == b:
            continue
        change = f"{key}: {a!r} -> {b!r}"
        if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
            harmless.append(change)
        elif key in batch_keys:
            harmless.append(change + " (same examples per optimizer step)")
        elif key in GROWABLE_KEYS and _grows(a, b):
            harmless.append(change + " (the learning-rate schedule is stretched to the new length)")
        else:
            blocking.append(change)
    return blocking, harmless


def _same_effective_batch(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """batch_size x gradient_accumulation_steps unchanged (the usual answer to out-of-memory): each optimizer step
    still sees the same examples in the same order, so the two keys may change together."""
    keys = ("training.batch_size", "training.gradient_accumulation_steps")
    try:
        same = before[keys[0]] * before[keys[1]] == after[keys[0]] * after[keys[1]]
    except (KeyError, TypeError):
        return set()
    return set(keys) if same else set()


def _grows(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and b >= a


def check_recipe_unchanged(saved_recipe: Path, recipe: Recipe) -> None:
    """Refuse to resume when the recipe changed in a way that makes the continued run a different run."""
    try:
        old = yaml.safe_load(saved_recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ResumeError(f"{saved_recipe}: cannot read the run's saved recipe to compare: {exc}") from exc
    blocking, harmless = recipe_changes(old, yaml.safe_load(dump_resolved(recipe)))
    for change in harmless:
        log.info("resume: recipe change accepted: %s", change)
    if blocking:
        raise ResumeError(
            f"{saved_recipe.parent}: cannot resume, the recipe changed what is trained: {'; '.join(blocking)}. "
            "Undo these changes, or start a new run (another output_dir, or --overwrite)"
        )


# ---------------------------------------------------------------------------------------------- data identity


def data_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """Size and SHA-256 of each local dataset file (hub datasets are pinned by name and split only)."""
    out: dict[str, Any] = {}
    for i, source in enumerate([*recipe.datasets, *recipe.eval_datasets]):
        path = Path(source.path).expanduser()
        if path.is_file():
            out[source.path] = {"bytes": path.stat().st_size, "sha256": sha256_file(path), "index": i}
    return out


def check_data_unchanged(saved: Path, recipe: Recipe) -> None:
    """A resumed run must read the same rows, or the skipped batches are not the ones it trained on."""
    if not saved.is_file():
        return
    before = json.loads(saved.read_text(encoding="utf-8"))
    now = data_fingerprint(recipe)
    for name, old in before.items():
        new = now.get(name)
        if new is None:
            raise ResumeError(f"{name}: dataset file is gone since the run started; restore it to resume")
        if new["sha256"] != old["sha256"]:
            raise ResumeError(
                f"{name}: dataset file changed since the run started ({old['bytes']} -> {new['bytes']} bytes); "
                "resuming would train on different rows. Restore the original file, or start a new run"
            )


# ---------------------------------------------------------------------------------------------- metrics


def truncate_metrics(path: Path, step: int) -> int:
    """Drop records logged after `step` (a killed run logged them, the resumed run will again); return how many."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


# ---------------------------------------------------------------------------------------------- the decision


def plan_resume(run: RunDir, recipe: Recipe) -> ResumePoint:
    """Check that the run may be continued and find where: the newest complete checkpoint (or step 0)."""
    if (run.summary).is_file():
        raise ResumeError(
            f"{run.root}: this run already finished (summary.json); nothing to resume. "
            "To train longer, start a new run (another output_dir, or --overwrite)"
        )
    check_recipe_unchanged(run.recipe, recipe)
    check_data_unchanged(run.data_fingerprint, recipe)
    point = find_resume_point(run.checkpoints)
    for path, reason in point.skipped:
        log.warning("resume: skipping %s: %s", path.name, reason)
    set_aside(point.skipped)
    if point.checkpoint is None:
        log.warning("resume: no complete checkpoint in %s; starting again from step 0", run.checkpoints)
        run.metrics.unlink(missing_ok=True)
        run.completions.unlink(missing_ok=True)
    else:
        dropped = truncate_metrics(run.metrics, point.step)
        truncate_metrics(run.completions, point.step)  # an RL run's sampled completions, logged by step too
        log.info("resume: continuing from %s (step %d)", point.checkpoint, point.step)
        if dropped:
            log.info("resume: %d metric records after step %d will be logged again", dropped, point.step)
    return point


def resume_hint(recipe_path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The command that continues this run."""
    parts = ["lora-tune", "train", recipe_path or "RECIPE", *overrides, "--resume"]
    return " ".join(parts)


def wants_resume(recipe: Recipe, *, resume: bool, overwrite: bool) -> bool:
    """Whether this start continues the run in output_dir: --resume, or the recipe's `training.resume: auto`."""
    # --overwrite is an explicit request for a fresh run; it wins over the recipe's standing `resume: auto`.
    return resume or (recipe.training.resume == "auto" and not overwrite)


def resume_point_of(run: RunDir, recipe: Recipe, *, resume: bool, overwrite: bool) -> ResumePoint:
    """Where a non-main process of a multi-process run starts: the checkpoint the main process resumes from, found
    after it checked the run and set broken checkpoints aside (this reads only)."""
    if not wants_resume(recipe, resume=resume, overwrite=overwrite):
        return ResumePoint(None)
    return find_resume_point(run.checkpoints)


def restore_token_count(trainer: Any, checkpoint: Path | None) -> int | None:
    """Carry TRL's running count of trained tokens over a resume; returns the count restored.

    TRL keeps it in `_total_train_tokens`, which starts at 0 in every new trainer, so after a resume the logged
    `num_tokens` (and the summary's `tokens_seen`) would count from the checkpoint. The checkpoint's
    trainer_state.json holds the last logged count.
    """
    if checkpoint is None or not hasattr(trainer, "_total_train_tokens"):
        return None
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return None
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    counts = [entry["num_tokens"] for entry in history if isinstance(entry.get("num_tokens"), (int, float))]
    if not counts:
        return None
    trainer._total_train_tokens = counts[-1]
    return int(counts[-1])


def evaluation_keeps_rng(trainer: Any) -> None:
    """Make the trainer's evaluations leave every random generator as they found it.

    An evaluation draws from the global generators (each DataLoader iterator draws its base seed), and a checkpoint
    saved at the end of an epoch holds the state from before the epoch's evaluation. A run resumed there shuffled
    the next epoch from that state, the uninterrupted run from the state after the evaluation: another data order
    and other dropout masks from the first step after the resume on (measured: losses apart from step 7 of 40 and
    the adapters 0.19 apart). With evaluation side-effect free, both continue from the same state.
    """
    evaluate = trainer.evaluate

    def evaluate_keeping_rng(*args: Any, **kwargs: Any) -> Any:
        with preserved_rng():
            return evaluate(*args, **kwargs)

    trainer.evaluate = evaluate_keeping_rng


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, numpy's and torch's generators (CPU and every CUDA device) restored on exit."""
    import random

    import numpy as np
    import torch

    python, numpy, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
