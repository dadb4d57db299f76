"""Tiled MLP: each decoder layer's MLP runs over the sequence in tiles, so its working set stops growing with it.

A gated MLP (Llama's gate/up/down) is the largest part of one layer's backward working set: per token it keeps the
gate output, act(gate), the up output and down_proj's input (4 x intermediate_size values, 14,336 each on an 8B),
and its backward adds their gradients. It is also token-wise (each token's output depends only on that token's
input), so it can run on slices of the sequence and give the same result. Here each slice runs under its own
non-reentrant checkpoint: the forward keeps only the slices' inputs (views of the MLP's input, no copy) and each
slice's intermediates exist only while that slice is computed or, in backward, recomputed and differentiated, one
slice at a time. This is the approach of Arctic Long Sequence Training's TiledMLP and of unsloth's long-context
training, written on `torch.utils.checkpoint` so it nests inside transformers' per-layer gradient checkpointing,
keeps autocast and the RNG state of dropout, and works on whatever the projections are: plain, LoRA-wrapped,
4-bit or 8-bit layers (peft wraps the projections, not the MLP, so patching the MLP's forward survives peft).

Cost: one more forward of each MLP slice in backward (measured by scripts/bench_long_context.py). Equality with the
untiled layer (loss and every gradient) is tested in tests/unit/model/test_tiling.py. Without gradients (eval,
generation, a reference model) the tiled forward is the original forward, bit for bit.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from lora_tune.model.attention import Choice

if TYPE_CHECKING:
    import torch

    from lora_tune.recipe.schema import TrainingConfig

log = logging.getLogger(__name__)

TILE_TOKENS = 2048  # per tile: large matmuls on any GPU (2,048 x 4,096 x 14,336 on an 8B), a small working set
AUTO_MIN_TOKENS = 16384  # auto: tile when one row (max_length) holds at least this many tokens
# Model types whose decoder layers hold a token-wise gated MLP at `.mlp` taking (hidden_states) only.
TOKENWISE_MLP = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"}  # the catalog's, each tested
ATTRIBUTE = "_lora_tune_untiled_forward"


def tile_tokens(hidden_size: int) -> int:
    """Tokens per tile: TILE_TOKENS. (Arctic's TiledMLP cuts the sequence into hidden_size-token shards; 2,048
    holds an 8B's 2 x 2,048-token step in two tiles, and a tile's MLP working set stays under 0.3 GiB.)"""
    return TILE_TOKENS


def resolve_tiled_mlp(training: TrainingConfig, model_type: str | None) -> Choice:
    """Whether the run tiles its MLPs, and why. `auto`: on for a token-wise MLP when one row holds at least
    AUTO_MIN_TOKENS tokens (max_length; null: the model's length); off below, where its extra MLP forward buys
    little, and a batch of shorter rows is better cut by a smaller batch (`lora-tune plan` proposes both)."""
    setting = training.tiled_mlp
    supported = model_type in TOKENWISE_MLP
    if setting is False:
        return Choice("off", "training.tiled_mlp: false")
    if training.liger:
        return Choice("off", "auto: Liger's SwiGLU kernel replaces the MLP forward")
    if not supported:
        reason = f"model type {model_type!r} is not one whose MLP lora-tune tiles ({', '.join(sorted(TOKENWISE_MLP))})"
        return Choice("off", reason)
    if setting is True:
        return Choice("on", "training.tiled_mlp: true")
    length = training.max_length
    if length is None or length >= AUTO_MIN_TOKENS:
        return Choice("on", f"auto: rows of {f'{length:,}' if length else 'the model length in'} tokens")
    return Choice("off", f"auto: rows of {length:,} tokens (< {AUTO_MIN_TOKENS:,})")


def mlp_modules(model: Any) -> list[Any]:
    """The decoder layers' MLP modules (`<layers>.N.mlp`)."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "mlp" and parts[-2].isdigit():
            found.append(module)
    return found


def apply_tiled_mlp(model: Any, tokens: int | None = None) -> int:
    """Make every decoder layer's MLP run in tiles of `tokens` tokens (default: tile_tokens(hidden_size)) when
    gradients are on; idempotent. Returns the number of MLPs tiled."""
    if tokens is None:
        tokens = tile_tokens(int(model.config.get_text_config().hidden_size))
    modules = mlp_modules(model)
    for module in modules:
        untiled = getattr(module, ATTRIBUTE, None) or module.forward
        setattr(module, ATTRIBUTE, untiled)
        module.forward = _tiled(untiled, tokens)
        module.tile_tokens = tokens
    return len(modules)


def remove_tiled_mlp(model: Any) -> None:
    for module in mlp_modules(model):
        untiled = getattr(module, ATTRIBUTE, None)
        if untiled is not None:
            module.forward = untiled
            delattr(module, ATTRIBUTE)


def tiled_forward(forward: Any, x: torch.Tensor, tokens: int) -> torch.Tensor:
    """`forward` (token-wise, (..., hidden) -> (..., out)) over `x` in tiles of `tokens` tokens, each checkpointed."""
    import torch
    from torch.utils.checkpoint import checkpoint

    flat = x.reshape(-1, x.shape[-1])
    if not torch.is_grad_enabled() or flat.shape[0] <= tokens:
        return forward(x)
    outputs = [checkpoint(forward, piece, use_reentrant=False) for piece in flat.split(tokens)]
    out = torch.cat(outputs)
    return out.view(*x.shape[:-1], out.shape[-1])


def _tiled(forward: Any, tokens: int) -> Any:
    def forward_in_tiles(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:  # an MLP called with more than its input is not the token-wise MLP this tiles
            return forward(x, *args, **kwargs)
        return tiled_forward(forward, x, tokens)

    return forward_in_tiles


def describe(model: Any, choice: Choice) -> str:
    tiled = [m for m in mlp_modules(model) if getattr(m, ATTRIBUTE, None) is not None]
    if choice.value != "on" or not tiled:
        return f"tiled MLP off ({choice.reason})"
    return f"tiled MLP on, {len(tiled)} layers in tiles of {tiled[0].tile_tokens:,} tokens ({choice.reason})"
