"""Turn the failures a long run meets (out of memory, full disk) into one clear line that says how to go on.

Both leave the run resumable: checkpoints only count once sealed (see `resume`), so a save cut short by a full disk
is skipped on resume, and an out-of-memory step never reaches a checkpoint.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_tune.errors import LoraTuneError
from lora_tune.recipe.schema import Recipe
from lora_tune.training.checkpoints import find_resume_point

GIB = 1024**3
# Tokenizer files, trainer_state.json, training_args.bin and the like, per checkpoint.
CHECKPOINT_OVERHEAD_BYTES = 64 * 1024**2


class OutOfMemory(LoraTuneError):
    """A training step ran out of (GPU or CPU) memory."""


class DiskFull(LoraTuneError):
    """Not enough disk space to train or to save."""


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def estimate_checkpoint_bytes(trainable: int, bytes_per_param: int = 4, optimizer_states: int = 2) -> int:
    """Adapter weights + the optimizer's per-parameter states (AdamW keeps 2 fp32 moments) + fixed overhead."""
    return trainable * (bytes_per_param + 4 * optimizer_states) + CHECKPOINT_OVERHEAD_BYTES


def disk_needed(recipe: Recipe, per_checkpoint: int) -> tuple[int, str]:
    """Bytes the run will hold on disk at its peak, and how that was counted."""
    t = recipe.training
    kept = t.save_total_limit if t.save_total_limit is not None else 3
    if t.save_strategy == "no":
        kept = 1  # a checkpoint is still written when a signal stops the run
    if t.max_steps is not None and t.save_strategy == "steps":
        kept = min(kept, t.max_steps // t.save_steps + 1)
    copies = kept + 1  # the one being written exists beside the kept ones until rotation
    total = per_checkpoint * copies + per_checkpoint  # + the final adapter folder (an upper bound)
    return total, f"{_gib(per_checkpoint)} per checkpoint x {copies} (kept + one being written) + final adapter"


def check_free_disk(folder: Path, recipe: Recipe, trainable: int) -> None:
    """Refuse to start when the run's folder cannot hold the checkpoints it will write."""
    need, how = disk_needed(recipe, estimate_checkpoint_bytes(trainable))
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskFull(
            f"output_dir: '{folder}' has {_gib(free)} free, the run needs about {_gib(need)} ({how}); "
            "free some space, lower training.save_total_limit, or choose an output_dir on a larger disk"
        )


def is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
    )


def oom_advice(recipe: Recipe) -> str:
    t = recipe.training
    tips = [
        f"lower training.batch_size (now {t.batch_size}) and raise training.gradient_accumulation_steps "
        f"(now {t.gradient_accumulation_steps}) to keep the same effective batch",
    ]
    if t.max_length is None or t.max_length > 512:
        tips.append(f"lower training.max_length (now {t.max_length})")
    if not t.gradient_checkpointing:
        tips.append("set training.gradient_checkpointing: true")
    if recipe.quantization.bits is None:
        tips.append("load the base in 4-bit (quantization.bits: 4)")
    if t.optimizer in ("adamw_torch", "adamw_torch_fused"):
        tips.append("use optimizer: paged_adamw_8bit")
    return "; ".join(tips)


@contextmanager
def translate_faults(recipe: Recipe, checkpoints: Path, resume_hint: str) -> Iterator[None]:
    """Around `trainer.train()`: out-of-memory and disk-full become one line naming the last good checkpoint."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, LoraTuneError):
            raise
        last = _last_good(checkpoints)
        if is_out_of_memory(exc):
            raise OutOfMemory(
                f"out of memory during a training step: {_first_line(exc)}. Try: {oom_advice(recipe)}. "
                f"{last} Resume with: {resume_hint}"
            ) from exc
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            free = _gib(shutil.disk_usage(checkpoints if checkpoints.exists() else checkpoints.parent).free)
            raise DiskFull(
                f"disk full while writing to {checkpoints} ({free} free now): {_first_line(exc)}. The unfinished "
                f"checkpoint will be skipped on resume. {last} Free some space, then resume with: {resume_hint}"
            ) from exc
        raise


def _last_good(checkpoints: Path) -> str:
    point = find_resume_point(checkpoints)
    if point.checkpoint is None:
        return "No complete checkpoint yet; resuming starts from step 0."
    return f"Last complete checkpoint: {point.checkpoint.name} (step {point.step})."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
