"""What a merge wrote and measured: `merging` fills it, the card and the verification read it, `format_merge`
says it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class MergeResult:
    """What `merge` wrote and measured."""

    output: Path
    dtype: str
    method: str  # "streaming" or "peft merge_and_unload"
    shards: int
    lora_modules: int  # weights that received a LoRA/DoRA update
    replaced_tensors: int  # modules_to_save tensors copied from the adapter
    untied: list[str]  # tied output weights written separately because the adapter changed one side
    max_abs_diff: float | None = None  # merged vs base + adapter, logits
    tolerance: float | None = None
    dequantized_vs_plain: float | None = None  # from_dequantized: vs the merge into the unquantized base
    vocab_size: int | None = None  # set when the adapter's embeddings were resized (added tokens)
    seconds: float = 0.0


def format_merge(result: MergeResult, *, next_step: bool = True) -> str:
    """Where the merged model is, how it was merged, what the verification measured and, with `next_step`, the
    command that publishes it."""
    lines = [
        f"Merged model written to {result.output}  ({result.method}, {result.dtype}, {result.shards} shard(s), "
        f"{result.lora_modules} adapted weights, {result.seconds:.1f}s)"
    ]
    if result.max_abs_diff is not None:
        lines.append(
            f"  verified: max |logit difference| {result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
        )
    if result.dequantized_vs_plain is not None:
        lines.append(
            f"  vs a merge into the unquantized base: max |logit difference| {result.dequantized_vs_plain:.3g}"
        )
    if next_step:
        lines.append(f"Next:\n  lora-tune push {result.output} ORG/NAME --dry-run")
    return "\n".join(lines)
