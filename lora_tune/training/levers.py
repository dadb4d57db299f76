"""Speed and memory levers resolved at run time: the attention kernel, the optimizer, the per-forward batch shape
of packed runs, and Liger's kernels. Each decision is logged once, with the reason, so a run says how it runs.

torch is imported inside the functions that need it: recipe validation and `lora-tune plan` import none of this.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_tune.data.packing import packing_plan
from lora_tune.model.attention import Choice, LeverError, is_installed, resolve_attention
from lora_tune.recipe.schema import Recipe

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_optimizer(recipe: Recipe, on_gpu: bool) -> Choice:
    """`auto`: paged 8-bit AdamW for a quantized base on a GPU (bitsandbytes pages only CUDA memory), else AdamW."""
    requested = recipe.training.optimizer
    if requested != "auto":
        return Choice(requested, "set in the recipe (training.optimizer)")
    if on_gpu and recipe.quantization.bits is not None:
        return Choice("paged_adamw_8bit", "quantized base on a GPU: 8-bit states, paged to CPU RAM under pressure")
    where = "on the CPU" if not on_gpu else "for an unquantized base"
    return Choice("adamw_torch", f"{where}: plain AdamW (paged optimizers page CUDA memory only)")


@dataclass(frozen=True)
class BatchShape:
    batch_size: int  # rows per forward pass
    gradient_accumulation_steps: int
    eval_batch_size: int
    reason: str | None  # set when it differs from the recipe's


def batch_shape(recipe: Recipe, *, packed: bool, attention: str, on_gpu: bool) -> BatchShape:
    """Packed rows one at a time on the CPU, with the accumulation multiplied to keep each optimizer step's tokens.

    Padding-free packing flattens a step's rows into one sequence; SDPA and eager then build a dense block-diagonal
    mask over all of it, O((rows x max_length)^2), which on the CPU costs more than packing saves (STACK-NOTES:
    about 0.7x at 8 x 512 tokens, 1.5x with one or two rows). Gradient accumulation normalises the loss over the
    whole optimizer step (num_items_in_batch), so one row per forward pass trains the same steps. Flash-attention's
    varlen kernels have no such mask, and GPUs want large matmuls: there the recipe's shape is kept.
    """
    t = recipe.training
    eval_batch = t.eval_batch_size or t.batch_size
    dense_mask = not attention.startswith("flash")
    if not packed or on_gpu or not dense_mask or t.batch_size == 1:
        return BatchShape(t.batch_size, t.gradient_accumulation_steps, eval_batch, None)
    reason = (
        f"packed rows one per forward pass on the CPU ({t.batch_size} x {t.gradient_accumulation_steps} -> "
        f"1 x {t.batch_size * t.gradient_accumulation_steps}): same rows per optimizer step, no "
        f"{t.batch_size * t.max_length if t.max_length else 0}-token dense attention mask"
    )
    return BatchShape(
        1, t.batch_size * t.gradient_accumulation_steps, 1 if t.eval_batch_size is None else eval_batch, reason
    )


def check_levers(recipe: Recipe, on_gpu: bool) -> None:
    """Refuse levers that cannot run here, before any data or weights are loaded."""
    t = recipe.training
    if t.liger and not on_gpu:
        raise LeverError(
            "training.liger: Liger's Triton kernels need a CUDA GPU; set training.liger: false on the CPU"
        )
    if t.liger and not is_installed("liger_kernel"):
        raise LeverError("training.liger: the liger-kernel package is missing; pip install 'lora-tune[liger]'")
    if recipe.rl.use_vllm and not on_gpu:
        raise LeverError("rl.use_vllm: vLLM generates on a CUDA GPU; set rl.use_vllm: false on the CPU")
    if recipe.rl.use_vllm and not is_installed("vllm"):
        raise LeverError("rl.use_vllm: the vllm package is missing; pip install vllm (docs/rl.md says which version)")
    if t.activation_offloading and not on_gpu:
        log.warning("training.activation_offloading is a GPU lever (it moves activations to CPU RAM); ignored here")


def apply_liger(model: Any) -> None:
    """Swap in Liger's RMSNorm, RoPE and SwiGLU kernels on the loaded model, before peft wraps it.

    Liger's (fused linear) cross-entropy stays off: TRL's chunked LM head already computes the loss without full
    logits, and TRL refuses Liger's fused linear cross-entropy, which would replace its forward.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    log.info("kernels: Liger RMSNorm, RoPE and SwiGLU applied")


def run_shape(recipe: Recipe, model_dtype: torch.dtype) -> tuple[BatchShape, str]:
    """The batch shape and optimizer name the trainer gets (recipe names; trl_args translates them)."""
    import torch

    on_gpu = torch.cuda.is_available()
    attention = resolve_attention(recipe.model.attn_implementation, model_dtype).value
    shape = batch_shape(recipe, packed=packing_plan(recipe).enabled, attention=attention, on_gpu=on_gpu)
    return shape, resolve_optimizer(recipe, on_gpu).value


def describe_levers(recipe: Recipe, model_dtype: torch.dtype, attention: Choice | None = None) -> str:
    """One line: what the run picked for attention (`attention`, when decided after loading), optimizer and batch
    shape, and why."""
    import torch

    on_gpu = torch.cuda.is_available()
    attention = attention or resolve_attention(recipe.model.attn_implementation, model_dtype)
    optimizer = resolve_optimizer(recipe, on_gpu)
    shape = batch_shape(recipe, packed=packing_plan(recipe).enabled, attention=attention.value, on_gpu=on_gpu)
    parts = [f"attention {attention.value} ({attention.reason})", f"optimizer {optimizer.value} ({optimizer.reason})"]
    if shape.reason:
        parts.append(shape.reason)
    return "; ".join(parts)
