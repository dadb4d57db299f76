"""bitsandbytes' packed 4-bit layout on CPUs with AVX512-BF16, kept where it is harmless and out where it is not.

On such a CPU (recent AMD Zen 4+, Intel Sapphire Rapids+), bitsandbytes' `Linear4bit.forward` in eval mode with an
input that needs no grad rewrites the layer's weight in place into a blocked layout with a bfloat16 absmax
(`quant_state.packing_format_for_cpu = True`) and computes in bfloat16 from then on. Three things follow:
- `dequantize_4bit` ignores the flag and returns scrambled values (relative error 1.45 measured);
- a packed layer has no autograd path (its kernel is inference-only), so training after an evaluation breaks;
- unpacking back is lossy: the absmax stays rounded to bfloat16 (and is re-quantized when nested).

So every model that trains, or whose float32 function is compared or decomposed (merge verification, LoftQ), is
loaded with packing off (`keep_unpacked`); inference-only loads (eval, generate, chat) keep bitsandbytes' faster
path and say so in one log line (`inference_note`); code that reads 4-bit values goes through `dequantize`, which
refuses packed data in one line instead of returning garbage.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lora_tune.errors import LoraTuneError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
FLAG = "support_avx512bf16_for_cpu"  # bitsandbytes' per-module switch for the packed CPU path


class PackedWeightError(LoraTuneError):
    """A 4-bit weight was read after bitsandbytes repacked it for bfloat16 CPU inference."""


def cpu_packs_4bit() -> bool:
    """True where bitsandbytes would repack 4-bit weights for eval forwards on this CPU (it has AVX512-BF16)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def four_bit_layers(model: Any) -> list[Any]:
    """Every bitsandbytes 4-bit linear layer of a model (peft's LoRA layers wrap them as `base_layer`)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def is_packed(weight: Any) -> bool:
    return bool(getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False))


def keep_unpacked(model: Any) -> int:
    """Turn bitsandbytes' packed CPU path off on every 4-bit layer, restoring any layer already packed; returns how
    many layers were restored (their absmax keeps the bfloat16 rounding the packing gave it)."""
    restored = 0
    for layer in four_bit_layers(model):
        setattr(layer, FLAG, False)
        if is_packed(layer.weight):
            unpack(layer.weight)
            restored += 1
    if restored:
        log.info("4-bit: %d layers had been repacked by bitsandbytes for bfloat16 inference; restored", restored)
    return restored


def allow_packing(model: Any, allowed: bool) -> None:
    """Let bitsandbytes pack (where this CPU supports it) or forbid it, layer by layer. Forbidding restores packed
    layers; allowing on a CPU without AVX512-BF16 changes nothing (there is no kernel for it)."""
    if not allowed:
        keep_unpacked(model)
        return
    packs = cpu_packs_4bit()
    for layer in four_bit_layers(model):
        setattr(layer, FLAG, packs)


def unpack(weight: Any) -> None:
    """Restore the standard layout of one packed 4-bit weight in place."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if state.absmax.dim() == 2:
        # bitsandbytes 0.50.2 transposes the absmax back only when nested: without double quantization it stays
        # (blocks per row, rows), which scrambles every layer whose rows hold more than one block (measured: 22%
        # relative error on a down_proj). The packing stored it as absmax.reshape(rows, blocks).T.
        state.absmax = state.absmax.T.reshape(-1).float()
    weight.quant_state = state
    if getattr(weight, "module", None) is not None:
        weight.module.quant_state = weight.quant_state


def dequantize(weight: Any) -> torch.Tensor:
    """The float values of a bitsandbytes 4-bit weight; refuses a packed one (its values would be scrambled)."""
    import bitsandbytes as bnb

    if is_packed(weight):
        raise PackedWeightError(
            "a 4-bit weight was repacked by bitsandbytes for bfloat16 CPU inference (AVX512-BF16); its values cannot "
            "be read as NF4: load the model with lora_tune.model.packed_4bit.keep_unpacked before any eval forward"
        )
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def inference_note(model: Any) -> str | None:
    """One line for an inference run whose 4-bit layers will compute in bfloat16 on this CPU, else None."""
    layers = four_bit_layers(model)
    if not layers or not any(getattr(layer, FLAG, False) for layer in layers):
        return None
    if next(model.parameters()).device.type != "cpu":
        return None
    return (
        f"4-bit: this CPU has AVX512-BF16, so bitsandbytes computes the {len(layers)} 4-bit layers in bfloat16 "
        "for inference; scores can differ slightly from a machine without it (training keeps the standard kernels)"
    )
