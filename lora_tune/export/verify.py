"""Check a merged folder against what it replaces, base + adapter, on a few fixed token inputs, in float32.

A streaming LoRA/DoRA merge into the unquantized base is checked one decoder layer at a time, reading both sides
from their safetensors files (layerwise.py): memory stays near one layer, and a failure names the layer. Otherwise
(other adapter types, peft's merge, --from-dequantized, an architecture the layer path cannot run) the whole-model
check runs: base + adapter through peft, then the merged model, one at a time, each whole in float32.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.export.errors import VerificationError
from lora_tune.export.layerwise import LayerDifference, LayerwiseOutcome, LayerwiseUnsupported, layerwise_logits
from lora_tune.export.streaming import read_adapter
from lora_tune.export.vocab import resize_to_adapter
from lora_tune.model.load import load_model

if TYPE_CHECKING:
    import torch

    from lora_tune.export.result import MergeResult
    from lora_tune.recipe.schema import Recipe

log = logging.getLogger(__name__)

# Largest allowed max |logit difference|, relative to the reference's largest |logit| (at least 1). Measured on
# a 4-layer hidden-256 Llama with random LoRA and DoRA adapters (relative max difference): fp32 ~1e-6 (float32
# rounding), fp16 ~8e-4, bf16 ~6.5e-3 (every weight rounded to 8 mantissa bits): ~10x headroom on that model. The
# headroom shrinks with depth: a Llama-3-8B-shaped bf16 merge measured 0.209 against a bound of 0.401, about 2x
# (BENCHMARKS.md). The bounds still catch a wrong scale, a missed module or a transposed update, which move logits
# by the size of the update itself.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}
SEQUENCES, LENGTH, SEED = 2, 24, 1234


def verification_inputs(vocab_size: int) -> torch.Tensor:
    """Fixed pseudo-random token ids: the same inputs for every model compared."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (SEQUENCES, LENGTH), generator=generator)


def logits_of(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits on the CPU, wherever the model sits: the 4-bit reference loads onto the GPU when there is one
    (bitsandbytes 0.50 adds no hook that would move CPU inputs there), the merged folder onto the CPU."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=input_ids.to(device)).logits.float().cpu()


def reference_logits(base_dir: Path, adapter: Path, recipe: Recipe, input_ids: torch.Tensor, *, quantized: bool):
    """Logits of base + adapter: the unquantized float32 base, or (quantized) the 4-bit base as in training."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if quantized:
        model_cfg = recipe.model.model_copy(update={"name": str(base_dir), "revision": None})
        training = recipe.training.model_copy(update={"gradient_checkpointing": False})
        base = load_model(model_cfg, recipe.quantization, training)
    else:
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.float32, trust_remote_code=recipe.model.trust_remote_code, use_safetensors=True
        )

    resize_to_adapter(base, adapter)
    model = PeftModel.from_pretrained(base, adapter)
    logits = logits_of(model, input_ids)
    del model, base
    gc.collect()
    return logits


def merged_logits(merged_dir: Path, input_ids: torch.Tensor, trust_remote_code: bool = False) -> torch.Tensor:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=torch.float32, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    logits = logits_of(model, input_ids)
    del model
    gc.collect()
    return logits


def relative_tolerance(dtype: str, reference: torch.Tensor) -> float:
    return TOLERANCE[dtype] * max(1.0, float(reference.abs().max()))


def verify_merge(
    merged_dir: Path,
    base_dir: Path,
    adapter: Path,
    recipe: Recipe,
    dtype: str,
    result: MergeResult,
    *,
    from_dequantized: bool = False,
) -> None:
    """Fill in result.max_abs_diff (and dequantized_vs_plain); raise VerificationError above the tolerance.

    A plain merge is checked against base + adapter on the unquantized base. A --from-dequantized merge is checked
    against the function trained (4-bit base + adapter), and its distance to the plain merge's function is reported.
    A streaming merge into the unquantized base is checked one layer at a time.
    """
    import json

    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    vocab = config.get("vocab_size") or config.get("text_config", {})["vocab_size"]
    input_ids = verification_inputs(vocab)
    layers: list[LayerDifference] = []
    outcome = _layerwise(merged_dir, base_dir, adapter, recipe, result, input_ids, from_dequantized)
    if outcome is not None:
        plain, trained, merged, layers = outcome.reference, None, outcome.merged, outcome.layers
    else:
        plain = reference_logits(base_dir, adapter, recipe, input_ids, quantized=False)
        trained = reference_logits(base_dir, adapter, recipe, input_ids, quantized=True) if from_dequantized else None
        merged = merged_logits(merged_dir, input_ids, recipe.model.trust_remote_code)
    reference = trained if trained is not None else plain
    result.max_abs_diff = float((merged - reference).abs().max())
    result.tolerance = relative_tolerance(dtype, reference)
    if trained is not None:
        result.dequantized_vs_plain = float((merged - plain).abs().max())
    against = "4-bit base + adapter (as trained)" if trained is not None else "base + adapter"
    worst = worst_layer(layers, dtype)
    log.info(
        "verify: max |logit difference| merged vs %s = %.3g (tolerance %.3g for %s)%s",
        against,
        result.max_abs_diff,
        result.tolerance,
        dtype,
        f"; largest layer difference {worst.max_abs:.3g} at {worst.name} (tolerance "
        f"{layer_tolerance(dtype, worst):.3g})"
        if worst
        else "",
    )
    layer_failed = worst is not None and not worst.max_abs <= layer_tolerance(dtype, worst)
    if not result.max_abs_diff <= result.tolerance or layer_failed:  # also catches NaN
        where = (
            f"; largest layer difference {worst.max_abs:.3g} at {worst.name} "
            f"(tolerance {layer_tolerance(dtype, worst):.3g})"
            if worst
            else ""
        )
        raise VerificationError(
            f"merge verification failed: max |logit difference| merged vs {against} is {result.max_abs_diff:.3g}, "
            f"{dtype} tolerance {result.tolerance:.3g}{where}; nothing was written (--no-verify keeps it anyway)"
        )


def _layerwise(
    merged_dir: Path,
    base_dir: Path,
    adapter: Path,
    recipe: Recipe,
    result: MergeResult,
    input_ids: torch.Tensor,
    from_dequantized: bool,
) -> LayerwiseOutcome | None:
    """The layer-by-layer check where it applies; None (with a one-line note) where the whole-model one must run.

    The adapter is read again here: the merge updates float32 tensors of its own copy in place.
    """
    if result.method != "streaming":
        reason = f"the merge used {result.method}"
    elif from_dequantized:
        reason = "--from-dequantized is checked against the real 4-bit model"
    else:
        try:
            plan = read_adapter(adapter)
            return layerwise_logits(merged_dir, base_dir, plan, input_ids, recipe.model.trust_remote_code)
        except LayerwiseUnsupported as exc:
            reason = str(exc)
    log.info(
        "verify: %s; checking the whole model instead: base + adapter, then the merged model, each whole in float32 "
        "memory",
        reason,
    )
    return None


def worst_layer(layers: list[LayerDifference], dtype: str) -> LayerDifference | None:
    """The layer whose difference is largest against its own tolerance."""
    return max(layers, key=lambda layer: layer.max_abs / layer_tolerance(dtype, layer), default=None)


def layer_tolerance(dtype: str, layer: LayerDifference) -> float:
    """The logits' relative bound, applied to one layer's output (relative to its largest value, at least 1)."""
    return TOLERANCE[dtype] * max(1.0, layer.scale)
