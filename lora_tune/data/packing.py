"""Packing: when it is exact for the model's attention, how it is passed to TRL, and what batching wastes.

`training.packing: true` uses TRL's best-fit-decreasing packing (`packing_strategy="bfd"`), which is padding-free:
examples are concatenated with `position_ids` restarting at 0 for each example, and no attention mask is sent.
Examples then stay separate in attention because
- flash_attention_2 / flash_attention_3 run varlen kernels on the sequence boundaries (`cu_seq_lens`) TRL's
  collator derives from the position ids;
- sdpa_varlen (what `auto` picks on the CPU for plain causal attention) runs SDPA on each example separately, cut
  at the same boundaries (lora_tune/model/attention.py);
- sdpa / eager get a block-diagonal causal mask that transformers builds from the position ids (packed-sequence
  detection in `masking_utils.create_causal_mask`, used by the models transformers ships). Exact, but the mask is
  dense: O(L^2) for the L = batch_size x max_length tokens of a step, so keep rows bounded on the CPU.
Model code from a repository (`trust_remote_code`) may ignore position ids and let packed examples attend to each
other, so packing is turned off there, with a warning. The loss never spans two examples: TRL's collator masks the
first token of every packed example.
Pure Python: importing this module loads no ML library.
"""

from __future__ import annotations

import bisect
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_tune.recipe.rules import PROMPT_LEARNING
from lora_tune.recipe.schema import Recipe

logger = logging.getLogger(__name__)

EXACT_ATTENTION = {
    "auto": "flash-attention varlen kernels, SDPA per example or SDPA's block-diagonal mask, whichever the run "
    "picks (all exact)",
    "flash_attention_2": "varlen kernel on the packed sequence boundaries",
    "flash_attention_3": "varlen kernel on the packed sequence boundaries",
    "sdpa": "block-diagonal causal mask built from the position ids (dense, O(L^2) in the packed length)",
    "sdpa_varlen": "SDPA run on each packed example separately (no mask over the row)",
    "eager": "block-diagonal causal mask built from the position ids (dense, O(L^2) in the packed length)",
}
PACK_CHUNK = 1000  # datasets.map's default batch size, over which TRL's BFD packing runs
CPU_PACKED_TOKENS_HINT = 4096  # beyond this many tokens per step, SDPA's dense mask costs more than packing saves


@dataclass(frozen=True)
class PackingPlan:
    enabled: bool
    reason: str  # why packing is on or off, for logs and the preview


def packing_plan(recipe: Recipe) -> PackingPlan:
    """Whether the run packs, and why: the recipe asks, and the attention implementation keeps examples apart."""
    t, model = recipe.training, recipe.model
    if t.objective != "sft":
        return PackingPlan(False, f"{t.objective} pads each prompt with its answers; packing is for sft")
    if recipe.vision is not None:
        return PackingPlan(False, "a vision run pads each conversation with its images; images are not packed")
    if not t.packing:
        return PackingPlan(False, "training.packing is false")
    if t.max_length is None:
        return PackingPlan(False, "packing needs training.max_length, which is null")
    if recipe.adapter.method in PROMPT_LEARNING:
        return PackingPlan(
            False,
            f"packing turned off for {recipe.adapter.method}: padding-free packing drops the attention mask and "
            "restarts positions per example, which the virtual tokens rely on",
        )
    if model.trust_remote_code:
        return PackingPlan(
            False,
            "packing turned off: the model runs its own code (trust_remote_code), which may ignore the position ids "
            "that keep packed examples apart",
        )
    how = EXACT_ATTENTION[model.attn_implementation]
    return PackingPlan(True, f"padding-free BFD packing; {model.attn_implementation}: {how}")


def sft_packing_args(recipe: Recipe) -> dict[str, Any]:
    """SFTConfig fields for the plan: BFD packing (padding-free in TRL) or none."""
    plan = packing_plan(recipe)
    if recipe.training.packing and not plan.enabled:
        # A default (not asked for) packing that cannot apply is not worth a warning.
        explicit = "packing" in recipe.training.model_fields_set
        logger.log(logging.WARNING if explicit else logging.INFO, "%s", plan.reason)
    if not plan.enabled:
        return {"packing": False}
    return {"packing": True, "packing_strategy": "bfd", "padding_free": True}


def warn_if_large_on_cpu(recipe: Recipe, on_gpu: bool) -> None:
    """SDPA's dense block mask makes very long padding-free rows slower than padded ones on the CPU.

    On the CPU packed rows go one per forward pass (`lora_tune.training.levers.batch_shape`), so the row length
    decides.
    """
    t = recipe.training
    tokens = t.max_length or 0
    if t.packing and not on_gpu and tokens > CPU_PACKED_TOKENS_HINT:
        logger.warning(
            "packing on the CPU gives each %d-token row a dense attention mask; a shorter training.max_length is "
            "faster",
            tokens,
        )


@dataclass(frozen=True)
class BatchingStats:
    """Token counts of one pass over the data as the trainer batches it."""

    mode: str  # "packed" or "padded"
    examples: int
    rows: int  # sequences the model sees: packed rows, or examples when padded
    steps: int  # forward passes (batches)
    tokens: int  # real tokens
    pad_tokens: int

    @property
    def padding_fraction(self) -> float:
        total = self.tokens + self.pad_tokens
        return self.pad_tokens / total if total else 0.0

    def describe(self) -> str:
        rows = f", {self.rows:,} packed rows" if self.mode == "packed" else ""
        return f"{self.mode}: {self.padding_fraction:.1%} padding ({self.steps:,} batches{rows})"


def batching_stats(
    lengths: Sequence[int], batch_size: int, *, packed: bool, max_length: int | None, seed: int = 0
) -> BatchingStats:
    """Padding of one epoch of `lengths` batched `batch_size` at a time, as TRL's collator pads.

    padded: each batch is padded to its longest example; the order is a seeded shuffle, like the trainer's sampler.
    packed: examples are packed best-fit-decreasing into rows of `max_length`, `batch_size` rows per step, and
    padding-free collation concatenates them, so there is no pad token at all.
    """
    tokens = sum(lengths)
    if packed:
        if max_length is None:
            raise ValueError("packing needs max_length")
        # TRL packs each `datasets.map` batch (PACK_CHUNK examples) separately; count rows the same way.
        rows = sum(len(bfd_rows(lengths[i : i + PACK_CHUNK], max_length)) for i in range(0, len(lengths), PACK_CHUNK))
        return BatchingStats("packed", len(lengths), rows, -(-rows // batch_size), tokens, 0)
    order = list(lengths)
    random.Random(seed).shuffle(order)
    pad = 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        pad += max(batch) * len(batch) - sum(batch)
    return BatchingStats("padded", len(lengths), len(lengths), -(-len(lengths) // batch_size), tokens, pad)


def bfd_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bins of the example indices (lengths cut to max_length), as TRL's "bfd" packs them."""
    order = sorted(range(len(lengths)), key=lambda i: -min(lengths[i], max_length))
    free: list[tuple[int, int]] = []  # sorted (free space, row index)
    rows: list[list[int]] = []
    for i in order:
        size = min(lengths[i], max_length)
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, row))
    return rows


def describe_batching(recipe: Recipe, lengths: Sequence[int]) -> str:
    """Padding fraction of the run's batching, with the other mode beside it: 'padding 0.0% packed (...); ...'."""
    t = recipe.training
    plan = packing_plan(recipe)
    padded = batching_stats(lengths, t.batch_size, packed=False, max_length=t.max_length, seed=t.seed)
    parts = [padded.describe()]
    if t.max_length is not None:
        packed = batching_stats(lengths, t.batch_size, packed=True, max_length=t.max_length)
        parts.insert(0, packed.describe())
    if not plan.enabled:
        parts.reverse()
    used, *other = parts
    return f"{used} [this run]{''.join(f'; {o}' for o in other)}"


def log_batching(recipe: Recipe, lengths: Sequence[int], *, on_gpu: bool) -> None:
    """The train-time data stats line about batching, and the CPU size hint for packing."""
    logger.info("batching: %s", describe_batching(recipe, lengths))
    if packing_plan(recipe).enabled:
        warn_if_large_on_cpu(recipe, on_gpu)
