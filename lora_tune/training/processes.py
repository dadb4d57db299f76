"""The rank-aware steps of a multi-process run (see `lora_tune.training.distributed` for strategies and launching).

The main process prepares the run directory and the data first, the others load its result; only the main process
writes files; every process's adapter weights are compared at the end; a failure names its rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.data import build_datasets
from lora_tune.data.pipeline import DataStats, PreparedData, SplitStats
from lora_tune.recipe.strategy import SHARDED
from lora_tune.run.layout import PREPARED_STATS, RunDir, write_json_atomic
from lora_tune.run.outputs import fresh_build_dir, is_build_dir
from lora_tune.training.distributed import Processes

if TYPE_CHECKING:
    from lora_tune.recipe.schema import Recipe

log = logging.getLogger(__name__)

FAIL_RANK_ENV = "LORA_TUNE_FAIL_ON_RANK"  # test hook: this rank raises after the data step (see the e2e tests)


class MainFirst:
    """The main process runs the preparation (run directory, pre-flight, tokenization) while the others wait;
    then they run theirs, reading what it wrote. No `finally`: when the main process fails, it exits and the
    launcher stops the waiting ones, so they never proceed on a half-prepared run."""

    def __init__(self, procs: Processes):
        self.procs = procs
        if procs.distributed and not procs.is_main:
            _barrier()

    def release(self) -> None:
        if self.procs.distributed and self.procs.is_main:
            _barrier()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_data(recipe: Recipe, tokenizer: Any, run: RunDir, procs: Processes) -> Any:
    """Tokenized data, built once: the main process builds it (and, in a multi-process job, saves it to the run
    directory); the others load that copy. A process that finds no copy (a node without the shared filesystem)
    builds its own, and says so."""
    cache = run.prepared_data
    if procs.is_main or not procs.distributed:
        prepared = build_datasets(recipe, tokenizer)
        if procs.distributed:
            log.info("data: tokenized on rank %d", procs.rank)
            _save_prepared(prepared, cache)
        return prepared
    if (cache / PREPARED_STATS).is_file():
        prepared = _load_prepared(cache)
        log.info("data: rank %d loaded the main process's tokenized data", procs.rank)
        return prepared
    log.warning("data: rank %d found no prepared data at %s (no shared filesystem?); tokenizing", procs.rank, cache)
    return build_datasets(recipe, tokenizer)


def _save_prepared(prepared: Any, cache: Path) -> None:
    from dataclasses import asdict

    fresh_build_dir(cache, "output_dir")  # marked: --overwrite and the next run know it as lora-tune's
    prepared.datasets.save_to_disk(str(cache / "datasets"))
    write_json_atomic(cache / PREPARED_STATS, asdict(prepared.stats))  # written last: marks the copy complete


def _load_prepared(cache: Path) -> Any:
    from datasets import load_from_disk

    # The other ranks need the token columns; the per-split counts come along for their logs. Source and drop
    # counts and the test split are the main process's to report and write.
    raw = json.loads((cache / PREPARED_STATS).read_text(encoding="utf-8"))
    splits = {k: SplitStats(**raw[k]) for k in ("train", "validation") if raw.get(k) is not None}
    stats = DataStats(**splits, test_rows=raw.get("test_rows", 0))
    return PreparedData(load_from_disk(str(cache / "datasets")), stats)


def remove_prepared_data(run: RunDir, procs: Processes) -> None:
    """After training every process has its data in memory (or memory-mapped: unlinking is safe on POSIX)."""
    if procs.is_main and is_build_dir(run.prepared_data):
        shutil.rmtree(run.prepared_data, ignore_errors=True)


def set_loading_environment(strategy: str, procs: Processes) -> None:
    """FSDP under torchrun: tell transformers to read the weights on rank 0 only (the others start empty and get
    them by broadcast), as `accelerate launch` with fsdp_cpu_ram_efficient_loading does. Set after the Trainer
    arguments are built, so they are not mistaken for an accelerate launcher's FSDP settings."""
    if strategy == "fsdp" and procs.distributed:
        os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
        os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")


def fail_here_for_test(procs: Processes) -> None:
    """Test hook: LORA_TUNE_FAIL_ON_RANK=N makes rank N fail, so tests can check a failure stops the job."""
    wanted = os.environ.get(FAIL_RANK_ENV)
    if wanted is not None and int(wanted) == procs.rank:
        raise RuntimeError(f"injected failure on rank {procs.rank} ({FAIL_RANK_ENV})")


def effective_batch_size(per_device: int, processes: int, accumulation: int) -> int:
    return per_device * processes * accumulation


def describe_batch(per_device: int, processes: int, accumulation: int, packed: bool = False) -> str:
    """The batch arithmetic in one line; with packing a batch item is a packed row of several examples."""
    total = effective_batch_size(per_device, processes, accumulation)
    unit = "packed rows (several examples each)" if packed else "examples"
    return (
        f"batch: {per_device} per device x {processes} process{'es' if processes > 1 else ''} x {accumulation} "
        f"accumulation = {total} {unit} per optimizer step"
    )


def batch_comment(per_device: int, processes: int, accumulation: int, strategy: str, packed: bool = False) -> str:
    """A YAML comment for the resolved recipe: how the run was launched (comments leave the recipe re-runnable)."""
    launch = f"{processes} processes ({strategy})" if processes > 1 else "1 process"
    return f"# run as {launch}; {describe_batch(per_device, processes, accumulation, packed)}\n"


def state_checksum(state: dict[str, Any]) -> str:
    """sha256 over the sorted names and raw bytes of a state dict's tensors: equal on every rank after a correct
    data-parallel run, and equal to the checksum of the saved adapter file."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def replica_checksums(model: Any, procs: Processes, strategy: str) -> list[str] | None:
    """Every rank's checksum of its adapter weights (on every rank), for DDP and ZeRO-2 where each process holds a
    full copy; None for sharded strategies and single-process runs."""
    if not procs.distributed or strategy in SHARDED:
        return None
    import torch.distributed as dist
    from peft import get_peft_model_state_dict

    mine = state_checksum(get_peft_model_state_dict(model))
    gathered: list[str | None] = [None] * procs.world_size
    dist.all_gather_object(gathered, mine)
    return [str(c) for c in gathered]


def save_sharded_adapter(trainer: Any, build: Path) -> None:
    """FSDP / ZeRO-3: every process joins in gathering the sharded adapter; the main one writes it to `build`."""
    if getattr(trainer, "is_fsdp_enabled", False):
        # Checkpoints stay sharded (fast, resumable); the adapter is gathered whole: Trainer.save_model writes
        # nothing for FSDP unless the state dict type is FULL_STATE_DICT (peft's FSDP example does the same).
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(build))
    if trainer.is_world_process_zero():
        (build / "training_args.bin").unlink(missing_ok=True)  # a pickle of TrainingArguments: not part of an adapter


def release_process_group() -> None:
    """Leave the process group at the end of a multi-process run. A group left to the interpreter's exit tears down
    gloo's threads in no set order, and a process can abort after its work is done ("terminate called without an
    active exception": the DDP tests hit it in two of five full-suite runs on a 2-core machine)."""
    import sys

    if "torch.distributed" not in sys.modules:  # a one-process run never imported it
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
