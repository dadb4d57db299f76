"""Adapters that resized the vocabulary (added tokens): the size they need, and the base resized to match before
peft loads them."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.export.errors import ExportError
from lora_tune.export.streaming import (
    ADAPTER_PREFIX,
)
from lora_tune.model.weights import (
    ShardReader,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class NeedsPeftMerge(Exception):
    """The streaming merge cannot reproduce this adapter unambiguously; peft's merge_and_unload() takes over."""


def resized_vocab(
    base_dir: Path,
    layout: dict[str, list[str]],
    replacements: dict[str, torch.Tensor],
    tied: dict[str, str],
    aliases: dict[str, str],
) -> int | None:
    """The new vocabulary size when modules_to_save tensors were resized (tokens added), else None.

    Every changed tensor must be [vocab, hidden] -> [new vocab, hidden] with one new size, and no other base tensor
    may keep the old vocabulary's rows (e.g. an lm_head tied to a resized embedding, or not saved by the adapter):
    its new rows were never saved, so the merge raises NeedsPeftMerge instead of guessing.
    """
    shapes: dict[str, list[int]] = {}
    for shard, names in layout.items():
        reader = ShardReader(base_dir / shard)
        shapes.update({name: list(reader.shape(name)) for name in names})
    for target, source in tied.items():
        shapes.setdefault(target, shapes[source])
    changed = {
        name: (shapes[name], list(t.shape)) for name, t in replacements.items() if list(t.shape) != shapes[name]
    }
    if not changed:
        return None
    old = {before[0] for before, _ in changed.values()}
    new = {after[0] for _, after in changed.values()}
    for name, (before, after) in changed.items():
        if len(before) != 2 or len(after) != 2 or before[1] != after[1] or len(old) != 1 or len(new) != 1:
            raise NeedsPeftMerge(f"modules_to_save tensor '{name}' changes shape {before} -> {after}")
    old_vocab, new_vocab = old.pop(), new.pop()
    outputs = [name for names in layout.values() for name in names] + list(aliases)
    for name in outputs:
        if name not in changed and len(shapes[name]) == 2 and shapes[name][0] == old_vocab:
            raise NeedsPeftMerge(
                f"the adapter resizes the vocabulary {old_vocab} -> {new_vocab} but carries no resized '{name}' "
                "(tied embeddings, or a resized layer missing from modules_to_save)"
            )
    log.info("merge: vocabulary resized by the adapter: %d -> %d tokens", old_vocab, new_vocab)
    return new_vocab


def resize_to_adapter(model: Any, adapter: Path) -> None:
    """Resize a freshly loaded base's embeddings to the vocabulary the adapter was trained with (added tokens).

    The size comes from the adapter's embedding tensors (modules_to_save copies, saved embedding layers or LoRA
    embedding factors). Rows the adapter does not carry are initialised under a fixed seed, so the peft merge and
    its verification see the same values.
    """
    import torch

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return
    modules = {id(m): n for n, m in model.named_modules()}
    layers = [model.get_input_embeddings(), model.get_output_embeddings()]
    names = [modules[id(m)] for m in layers if m is not None and id(m) in modules]
    current = model.get_input_embeddings().weight.shape[0]
    sizes = set()
    for key, info in ShardReader(weights).header.items():
        if ".original_module." in key:
            continue
        name = re.sub(
            r"\.(modules_to_save\.default|modules_to_save|default)(?=\.|$)", "", key.removeprefix(ADAPTER_PREFIX)
        )
        for layer in names:
            if name == f"{layer}.weight" and len(info["shape"]) == 2:
                sizes.add(info["shape"][0])
            elif name == f"{layer}.lora_embedding_A" and len(info["shape"]) == 2:
                sizes.add(info["shape"][1])
    sizes.discard(current)
    if not sizes:
        return
    if len(sizes) > 1:
        raise ExportError(f"adapter: embedding tensors disagree on the vocabulary size ({sorted(sizes)})")
    size = sizes.pop()
    log.info("merge: resizing the base's embeddings %d -> %d tokens, as the adapter was trained", current, size)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model.resize_token_embeddings(size, mean_resizing=False)
