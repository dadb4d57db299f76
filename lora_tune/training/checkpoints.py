"""Checkpoints that are provably complete.

transformers' Trainer writes `checkpoint-N/` file by file (adapter, optimizer, scheduler, RNG, trainer_state) with no
temporary name, so a process killed mid-save leaves a folder that looks like a checkpoint. Here a checkpoint counts
only once a manifest (every file's size and SHA-256) has been written into it, atomically and last, by a callback
that runs after the Trainer's save. Rotation (`save_total_limit`) is done here too, so an older complete checkpoint
is deleted only after a newer one is sealed.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.run.layout import sha256_file, write_json_atomic

MANIFEST = "lora_tune_complete.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class ResumePoint:
    """Where a run starts: a checkpoint to continue from (None = step 0) and the checkpoints passed over."""

    checkpoint: Path | None
    step: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def write_manifest(checkpoint: Path, step: int) -> None:
    """Seal a fully written checkpoint: sizes and hashes of its files, written last under a temporary name."""
    files = {
        str(p.relative_to(checkpoint)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(checkpoint.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    write_json_atomic(checkpoint / MANIFEST, {"step": step, "files": files})


def verify_checkpoint(checkpoint: Path) -> str | None:
    """None when the checkpoint is complete and intact, else why not (one short phrase)."""
    marker = checkpoint / MANIFEST
    if not marker.is_file():
        return "incomplete (no completion manifest: the save was interrupted)"
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """`checkpoint-N` folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found)


def find_resume_point(root: Path) -> ResumePoint:
    """The newest checkpoint under `root` that verifies; the newer ones that do not are listed as skipped."""
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(checkpoint_dirs(root)):
        reason = verify_checkpoint(path)
        if reason is None:
            return ResumePoint(path, step, skipped)
        skipped.append((path, reason))
    return ResumePoint(None, 0, skipped)


def set_aside(skipped: list[tuple[Path, str]]) -> None:
    """Move bad checkpoints out of the Trainer's sight (it would otherwise overwrite into, or rotate by, them)."""
    for path, _ in skipped:
        target = path.parent / "broken" / path.name
        target.parent.mkdir(exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        path.rename(target)


def rotate(root: Path, keep: int | None, protect: Path | None = None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never `protect`, the best one); incomplete ones older
    than the newest complete one go too, since nothing can resume from them."""
    entries = checkpoint_dirs(root)
    complete = [(s, p) for s, p in entries if (p / MANIFEST).is_file()]
    if not complete:
        return
    newest_step = complete[-1][0]
    doomed = [p for s, p in entries if not (p / MANIFEST).is_file() and s < newest_step]
    if keep is not None:
        best = [p for _, p in complete if protect is not None and p.resolve() == protect.resolve()]
        others = [p for _, p in complete if p not in best]
        keep_others = max(1, keep - len(best))  # the best one counts towards the limit, the newest always stays
        doomed += others[: max(0, len(others) - keep_others)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_callback(root: Path, keep: int | None) -> Any:
    """A TrainerCallback that seals each checkpoint right after the Trainer saved it, then rotates."""
    from transformers import TrainerCallback

    class SealCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
            if state.is_world_process_zero:
                path = root / f"checkpoint-{state.global_step}"
                if path.is_dir():
                    write_manifest(path, state.global_step)
                    best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
                    rotate(root, keep, protect=best)
            return control

    return SealCheckpoints()
