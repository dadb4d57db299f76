"""A quantized base prepared for training, with its frozen 16-bit weights left in bfloat16.

peft's `prepare_model_for_kbit_training` freezes the base, casts every bfloat16/float16 parameter that is not a
4-bit weight to float32 and turns gradient checkpointing on. The cast is what costs: on Llama 3 8B the embeddings,
LM head and norms take 3.92 GiB in float32 against 1.96 GiB in bfloat16, and the float32 embeddings make the
residual stream float32, so every checkpointed layer input is twice as large as in bfloat16. None of them trains.
torchtune and unsloth keep them in the compute dtype; so does this function for bfloat16. The logits and the loss
are unchanged in precision: TRL's chunked LM head computes each tile in the autocast dtype (bfloat16) whatever the
head's dtype, and its softmax and loss in float32 (tests/unit/model/test_kbit.py compares the loss with peft's).

float16 bases (GPUs without bfloat16) keep peft's float32 cast: float16's range is too narrow for a residual
stream kept in it. A float32 base (the CPU) is unchanged either way.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

CHECKPOINTING = {"use_reentrant": False}


def prepare_for_kbit_training(model: Any, *, gradient_checkpointing: bool) -> Any:
    """Freeze the base; cast frozen float16 weights (not bfloat16 ones) to float32; non-reentrant checkpointing."""
    import torch

    for param in model.parameters():
        param.requires_grad_(False)
    cast = 0
    for param in model.parameters():
        if param.dtype == torch.float16 and param.__class__.__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
            cast += param.numel()
    if cast and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.x; gradient_checkpointing_enable is its deprecated alias
            enable(activation_checkpointing_kwargs=dict(CHECKPOINTING))
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(CHECKPOINTING))
    return model


def frozen_unquantized_bytes(model: Any) -> dict[str, int]:
    """Bytes of the frozen parameters that are not quantized, by dtype name: what the preparation decides."""
    sizes: dict[str, int] = {}
    for param in model.parameters():
        if param.requires_grad or param.__class__.__name__ in ("Params4bit", "Int8Params"):
            continue
        name = str(param.dtype).removeprefix("torch.")
        sizes[name] = sizes.get(name, 0) + param.numel() * param.element_size()
    return sizes
