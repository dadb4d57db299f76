"""What a merge wrote and measured: `merging` fills it, the card and the verification read it."""

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
