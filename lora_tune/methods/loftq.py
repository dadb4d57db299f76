"""LoftQ initialisation: LoRA factors that start by cancelling each layer's 4-bit quantization error.

For every 4-bit LoRA layer, with W the layer's original weight (read tensor by tensor from the base's safetensors
files) and Q(W) its NF4 dequantization, the rank-r truncated SVD of the residual R = W - Q(W) gives the factors:

    U, S, V^T = svd(R)      B = U_r sqrt(S_r) / sqrt(s)      A = sqrt(S_r) V^T_r / sqrt(s)

so that Q(W) + s * B @ A is the best rank-r correction of the quantized weight (s = the LoRA scale, alpha / r).
This is one LoftQ iteration on an already quantized base, as peft's `replace_lora_weights_loftq` does, with two
differences:
- it runs where the weights are (CPU or GPU): peft moves every weight to "cuda" unconditionally;
- it divides by the LoRA scale: peft leaves it out (peft issue #1982), so its correction is s times too large
  whenever alpha != r.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from lora_tune.errors import MethodError
from lora_tune.model.packed_4bit import dequantize, keep_unpacked
from lora_tune.model.weights import ShardReader, base_layout, match_names, resolve_base
from lora_tune.recipe.schema import ModelConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
PEFT_PREFIX = "base_model.model."


def loftq_factors(
    quantized: Any, original: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for one bitsandbytes 4-bit weight and its original values; float32, on the quantized weight's device."""
    import torch

    dequantized = dequantize(quantized).float()
    residual = original.to(device=dequantized.device, dtype=torch.float32) - dequantized
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = (S[:rank] / scale).sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root


def init_loftq(model: Any, base: ModelConfig, adapter: str = "default") -> int:
    """Set the LoRA factors of every 4-bit LoRA layer of a peft model by LoftQ; returns how many layers."""
    from peft.tuners.lora import Linear4bit

    keep_unpacked(model)  # an eval forward on an AVX512-BF16 CPU may have repacked them: LoftQ fits the NF4 values
    layers = {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, Linear4bit) and adapter in module.lora_A
    }
    if not layers:
        raise MethodError("adapter.init: loftq found no 4-bit LoRA layer; it needs quantization.bits: 4")
    folder = resolve_base(base)
    shard_of = {name: shard for shard, names in base_layout(folder).items() for name in names}
    tensor_of = match_names([f"{name}.weight" for name in layers], list(shard_of), "LoftQ weight")
    readers = {shard: ShardReader(folder / shard) for shard in {shard_of[t] for t in tensor_of.values()}}
    started = time.perf_counter()
    for name, module in layers.items():
        tensor = tensor_of[f"{name}.weight"]
        original = readers[shard_of[tensor]].read(tensor)
        A, B = loftq_factors(module.weight, original, module.r[adapter], module.scaling[adapter])
        for factor, value in ((module.lora_A[adapter].weight, A), (module.lora_B[adapter].weight, B)):
            factor.data = value.to(dtype=factor.dtype)
    log.info("LoftQ: %d layers initialised from %s in %.1f s", len(layers), folder, time.perf_counter() - started)
    return len(layers)
