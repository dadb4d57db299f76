"""SDPA run once per packed example: exact padding-free packing on the CPU without a dense block mask.

Padding-free packing sends one flattened row with `position_ids` restarting at 0 for each example. For `sdpa`,
transformers turns that into a dense block-diagonal causal mask over the whole row: O(L^2) to build, and SDPA then
computes every masked-out score anyway. Flash-attention's varlen kernels skip both, but they are GPU-only. This
attention function does what they do with plain SDPA: it cuts the row at the example boundaries TRL's collator
already sends (`cu_seq_lens_q`, else the restarts in `position_ids`) and runs causal SDPA on each example, so the
cost is the sum of the examples' squares. Measured on the CPU (scripts/bench_attention.py): the same loss and
gradients as the block mask (to 1.7e-8), and a 512-token packed row of four examples trains about 10% faster.

Anything that is not a padding-free row (a padding mask, a KV cache, batch > 1) goes to transformers' own SDPA
function with the mask transformers builds, so evaluation and generation are unchanged. It is chosen only for model
classes whose attention is plain causal attention (no sliding window, no logit soft-capping), which
`unsupported_reason` checks from the config.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_tune.errors import LoraTuneError
from lora_tune.model import attention as varlen_attention
from lora_tune.recipe.schema import Recipe

if TYPE_CHECKING:
    import torch

NAME = "sdpa_varlen"
# Model classes whose attention is a plain call of the attention interface on (query, key, value, causal mask);
# each is checked against transformers' SDPA path in tests/unit/model/test_attention.py.
PLAIN_CAUSAL = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def unsupported_reason(config: Any, max_length: int | None) -> str | None:
    """Why this model cannot use per-example SDPA, or None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in PLAIN_CAUSAL:
        checked = ", ".join(sorted(PLAIN_CAUSAL))
        return f"model type {model_type!r} is not one whose attention lora-tune checked ({checked})"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "layers with sliding-window attention need transformers' mask"
    window = getattr(config, "sliding_window", None)  # qwen2/qwen3 set it to None when they do not use it
    if window is not None and (max_length is None or max_length > window):
        return f"sliding-window attention ({window} tokens, shorter than max_length) needs transformers' mask"
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping needs transformers' eager path"
    return None


def register() -> None:
    """Make `sdpa_varlen` a name transformers accepts (`attn_implementation`); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)


def mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: Any = None,
    local_size: int | None = None,
    use_vmap: bool = False,
    **kwargs: Any,
) -> Any:
    """No mask for a padding-free row (the attention function splits it); transformers' SDPA mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    padding_free_row = attention_mask is None and batch_size == 1 and q_length == kv_length
    if padding_free_row and local_size is None and not use_vmap:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        attention_mask=attention_mask,
        local_size=local_size,
        use_vmap=use_vmap,
        **kwargs,
    )


def attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal SDPA on each example of a padding-free row; transformers' SDPA for everything else."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _example_bounds(query, key, attention_mask, kwargs)
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    out = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    return out.transpose(1, 2).contiguous(), None


def _example_bounds(query: Any, key: Any, attention_mask: Any, kwargs: dict[str, Any]) -> list[int] | None:
    """Start offsets of the examples in a padding-free row plus its length, or None when it is not one."""
    length = query.shape[2]
    if attention_mask is not None or query.shape[0] != 1 or key.shape[2] != length:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None and (bounds := cu.tolist())[-1] == length:
        return bounds
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[-1] != length:
        return [0, length]
    starts = (positions.reshape(-1) == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, length]


class LeverError(LoraTuneError):
    """A speed lever the recipe asks for cannot work here (no GPU, package missing)."""


@dataclass(frozen=True)
class Choice:
    value: str
    reason: str


def resolve_attention(requested: str, dtype: torch.dtype) -> Choice:
    """`auto`: flash-attention 3 on Hopper, 2 on Ampere or newer when installed and the dtype is 16-bit, else SDPA."""
    if requested != "auto":
        return Choice(requested, "set in the recipe (model.attn_implementation)")
    import torch

    if not torch.cuda.is_available():
        return Choice("sdpa", "no CUDA GPU; flash-attention kernels are GPU-only")
    if dtype not in (torch.float16, torch.bfloat16):
        return Choice("sdpa", f"model dtype is {str(dtype).removeprefix('torch.')}; flash-attention needs 16-bit")
    major, minor = torch.cuda.get_device_capability()
    gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    if major == 9 and is_installed("flash_attn_interface"):
        return Choice("flash_attention_3", f"flash-attn 3 installed and {gpu} is a Hopper GPU")
    if major >= 8 and is_installed("flash_attn"):
        return Choice("flash_attention_2", f"flash-attn 2 installed and {gpu} is Ampere or newer")
    if major < 8:
        return Choice("sdpa", f"{gpu} is older than Ampere; flash-attention needs sm_80+")
    return Choice("sdpa", f"flash-attn is not installed (pip install flash-attn for varlen kernels on {gpu})")


def use_varlen_attention(model: Any, recipe: Recipe, packed: bool) -> Choice:
    """Switch a loaded model to SDPA per packed example (lora_tune/model/attention.py) where that is exact.

    `auto` picks it on the CPU when transformers' SDPA was chosen, packing is padding-free and the model's attention
    is plain causal attention; `sdpa_varlen` in the recipe asks for it and fails here when the model cannot use it.
    """
    requested = recipe.model.attn_implementation
    current = model.config._attn_implementation
    nothing_to_switch = requested == "auto" and (current != "sdpa" or not packed)
    if requested not in ("auto", varlen_attention.NAME) or nothing_to_switch:
        return resolve_attention(requested, model.dtype)  # what the model was loaded with, and why
    why_not = varlen_attention.unsupported_reason(model.config, recipe.training.max_length)
    if requested == varlen_attention.NAME and why_not:
        raise LeverError(f"model.attn_implementation: sdpa_varlen cannot run this model: {why_not}; use sdpa")
    if requested == "auto" and model.device.type != "cpu":
        # Measured on the CPU only; on a GPU the per-example kernels and boundary reads are unmeasured.
        return Choice(current, "SDPA with transformers' block-diagonal mask (install flash-attn for varlen kernels)")
    if why_not:
        return Choice(current, f"SDPA with transformers' block-diagonal mask: {why_not}")
    varlen_attention.register()
    model.set_attn_implementation(varlen_attention.NAME)
    return Choice(
        varlen_attention.NAME,
        "SDPA per packed example (exact, like flash-attention's varlen kernels): no dense block mask over the row",
    )


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
