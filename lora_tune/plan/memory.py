"""`lora-tune plan`: peak GPU memory of a recipe's run, estimated from the model's config alone.

No torch, no weights: the estimate is arithmetic on the shapes in config.json (`lora_tune.plan.shape`).
What it counts, for one GPU, bf16 compute (dtype auto on a GPU):
- weights: 4-bit layers as bitsandbytes stores them (packed NF4/FP4 bytes + absmax per 64-block, itself 8-bit with
  double quantization), 8-bit as int8 + one fp32 scale per row, else the model dtype. Embeddings, LM head and norms
  stay unquantized, in bf16 on a bf16 run (lora_tune.model.kbit; peft's preparation would make them float32, and
  the residual stream with them), in float32 on a float16 one.
- adapter: LoRA (and DoRA/bias/saved-module) parameters in float32, their float32 gradients, optimizer state:
  AdamW 8 bytes/param, 8-bit AdamW 2 bytes/param + block scales (tensors under 4,096 elements stay 32-bit), Adafactor
  factored rows + columns, SGD none. Paged optimizers keep their state in CUDA unified memory: counted, but it can
  spill to CPU RAM under pressure, and torch's allocator statistics do not see it.
- activations: without checkpointing, every layer keeps the tensors its backward needs (per token: RMSNorm's fp32
  input, inputs of the adapted layers, attention q/k/v/out, the gated MLP's three intermediate tensors); with
  checkpointing, each layer keeps only its input and one layer is recomputed at a time; with a tiled MLP
  (lora_tune.model.tiling) the MLP's part of a layer is held for one tile of tokens only. The levers are priced in
  lora_tune.plan.levers.
- logits: TRL's chunked LM head (TRL >= 1.14) never builds the (tokens x vocab) logits; its tiles are counted.
- overhead: CUDA context and cuBLAS workspaces (fixed), allocator fragmentation (a share of activations).
Tokens per step are batch_size x max_length, the worst case, as padded or packed rows can reach it.
Preference objectives (training.objective): each row runs two answers in one pass (chosen and rejected; KTO's
completion and its KL pair), so twice the tokens; DPO and KTO also run the reference policy (the adapter switched
off) forward without gradients unless `preference.precompute_ref_log_probs`: one layer's activations and the LM-head
tiles at a time, counted as "reference forward".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_tune.model.tiling import resolve_tiled_mlp, tile_tokens
from lora_tune.plan.shape import (
    ModelShape,
    PlanError,
    PlanOptionError,
    lora_targets,
    read_model_config,
    shape_from_config,
    trainable_parameters,
)
from lora_tune.plan.vision import vision_shape
from lora_tune.recipe.rules import OBJECTIVES, honours
from lora_tune.recipe.schema import Recipe
from lora_tune.training.levers import resolve_optimizer

GIB = 1024**3
BLOCK_4BIT = 64  # bitsandbytes' 4-bit quantization block
NESTED_BLOCK = 256  # double quantization: one fp32 scale per 256 absmax values
BLOCK_8BIT_OPTIM, MIN_8BIT_OPTIM_SIZE = 256, 4096  # bitsandbytes' blockwise 8-bit optimizer states
LOGPROB_TOKEN_CHUNK, LOGPROB_VOCAB_CHUNK = 4096, 32768  # TRL's chunked log-prob tiles
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # context + cuBLAS/cuDNN workspaces; outside torch's allocated figure
FRAGMENTATION = 0.10  # caching-allocator slack on activations
PAIRS = ("", " x 2 answers")  # sft rows, preference rows (chosen and rejected in one pass)
UPCAST, FULL_LOGITS = "float32 frozen weights", "full logits"  # always-on levers, priced by leaving them out


@dataclass
class MemoryPlan:
    model: str
    config_source: str
    shape: ModelShape
    tokens_per_step: int
    parts: dict[str, int]  # component -> bytes; their sum is the peak estimate
    details: dict[str, str]  # component -> how it was counted
    trainable_parameters: int
    gpu_memory: int
    gpu_memory_source: str
    notes: list[str] = field(default_factory=list)
    suggestions: list[tuple[str, list[str], int]] = field(default_factory=list)  # (what, overrides, new peak)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    paged_bytes: int = 0  # optimizer state in CUDA unified memory (paged optimizers)

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should read: no context, no allocator slack, no unified memory."""
        return self.total - self.parts["overhead"] - self.parts["fragmentation"] - self.paged_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory


def estimate(
    recipe: Recipe, shape: ModelShape, without: frozenset[str] = frozenset()
) -> tuple[dict[str, int], dict[str, str], int, int]:
    """Peak bytes per component, how each was counted, trainable parameter count and paged bytes. `without` names
    levers that are always on, to price them (lora_tune.plan.levers): UPCAST (peft's float32 frozen weights, and so
    a float32 residual stream) and FULL_LOGITS (the whole logits instead of TRL's chunked LM head)."""
    t, q = recipe.training, recipe.quantization
    act = 4 if recipe.model.dtype == "float32" else 2  # bytes per activation element (bf16 autocast on a GPU)
    tokens = tokens_per_step(recipe, shape)
    dtype = "float16" if UPCAST in without else recipe.model.dtype  # float16 bases keep peft's float32 cast
    weights, weights_how = weight_bytes(shape, q.bits, q.double_quant, act, dtype)
    residual = 4 if q.bits is not None and (dtype == "float16" or act == 4) else act
    tensors = trainable_parameters(shape, recipe.adapter)
    params = sum(n for _, n in tensors)
    trained = trainable_bytes(recipe, act)
    optimizer = resolve_optimizer(recipe, on_gpu=True).value
    optim, optim_how = optimizer_bytes(optimizer, [n for _, n in tensors])
    stored, layer = activation_bytes(recipe, shape, act, tokens, residual)
    logits = full_logits_bytes(shape, act, tokens) if FULL_LOGITS in without else logits_bytes(shape, act, tokens)
    tiled = tiles_mlp(recipe, shape)
    mlp_tokens = min(tokens, tile_tokens(shape.hidden_size)) if tiled else tokens
    # Backward of one layer: its saved tensors plus the larger of the MLP's gradients (a tile's, when tiled) and the
    # attention kernel's (fp32 dq accumulator, dq/dk/dv, the incoming and outgoing gradient of the hidden states).
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention_grads = tokens * (4 * q_dim + act * (q_dim + 2 * kv_dim) + 2 * act * shape.hidden_size)
    working = max(logits, layer + max(2 * act * mlp_tokens * shape.intermediate_size, attention_grads))
    parts = {
        "weights": weights,
        "adapter": trained * params,
        "gradients": trained * params,
        "optimizer": optim,
        "activations": stored,
        "backward working set": working,
        "fragmentation": int(FRAGMENTATION * (stored + working)),
        "overhead": CUDA_CONTEXT_BYTES,
    }
    if needs_reference_pass(recipe):
        parts["reference forward"] = max(logits, layer)
    generation = generation_bytes(recipe, shape, act)
    if generation:  # sampling and the training pass do not overlap: only what sampling needs beyond it counts
        parts["generation KV cache"] = max(0, generation - (stored + working))
    pairs = OBJECTIVES[t.objective].task == "preference"
    ckpt = "checkpointed: layer inputs + one recomputed layer" if t.gradient_checkpointing else "all layers kept"
    trained_dtype = "bf16: TRL casts a quantized base's adapter" if trained == 2 else "fp32"
    details = {
        "weights": weights_how,
        "adapter": f"{params:,} trainable params ({trained_dtype})",
        "gradients": f"{'bf16' if trained == 2 else 'fp32'}, one per trainable param",
        "optimizer": optim_how,
        "activations": f"{tokens:,} tokens/step ({t.batch_size} x {t.max_length}{PAIRS[pairs]}), {ckpt}"
        + ("; layer inputs offloaded to CPU RAM" if t.activation_offloading else ""),
        "backward working set": "max(chunked LM-head tiles, one layer's recompute + its MLP or attention gradients)"
        + (f"; MLP in tiles of {tile_tokens(shape.hidden_size):,} tokens" if tiled else ""),
        "fragmentation": f"{FRAGMENTATION:.0%} of activations (caching allocator)",
        "overhead": "CUDA context + library workspaces",
        "reference forward": "no-grad pass of the policy without its adapter: one layer or the LM-head tiles",
        "generation KV cache": _generation_detail(recipe),
    }
    paged = optim if optimizer.startswith("paged_") else 0
    return parts, details, params, paged


def tokens_per_step(recipe: Recipe, shape: ModelShape) -> int:
    """Tokens in one forward pass per device: batch x max_length, twice that for the preference objectives (an
    online RL batch counts completions, each prompt + completion within max_length)."""
    t = recipe.training
    answers = 2 if OBJECTIVES[t.objective].task == "preference" else 1
    return answers * t.batch_size * (t.max_length or shape.max_position_embeddings or 2048)


def needs_reference_pass(recipe: Recipe) -> bool:
    """DPO and KTO compare with a reference policy during training unless its log-probabilities are precomputed;
    GRPO and RLOO do when their KL penalty (rl.beta) is not 0."""
    needs = OBJECTIVES[recipe.training.objective]
    if needs.task == "rl":
        return (recipe.rl.beta if recipe.rl.beta is not None else needs.default_beta or 0.0) > 0
    return needs.reference and not recipe.preference.precompute_ref_log_probs


def generation_sequences(recipe: Recipe) -> int:
    """Completions an online RL run samples at once per device: a batch of generations (batch_size completions x
    steps per generation, whole groups of num_generations); 0 for the other objectives."""
    if OBJECTIVES[recipe.training.objective].task != "rl":
        return 0
    t = recipe.training
    return t.batch_size * (recipe.rl.steps_per_generation or t.gradient_accumulation_steps)


def generation_bytes(recipe: Recipe, shape: ModelShape, act: int) -> int:
    """What sampling a batch of generations holds: the KV cache of every layer for prompt + completion (max_length
    tokens) of each sequence, and one step's logits in float32."""
    sequences = generation_sequences(recipe)
    if not sequences:
        return 0
    length = recipe.training.max_length or shape.max_position_embeddings or 2048
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * act
    return sequences * (length * kv + 4 * shape.vocab_size)


def _generation_detail(recipe: Recipe) -> str:
    n = generation_sequences(recipe)
    return (
        f"{n} completions sampled at once ({recipe.rl.num_generations} per prompt), K and V of every layer for "
        f"max_length tokens each; beyond the training pass's activations (they do not overlap)"
    )


def weight_bytes(
    shape: ModelShape, bits: int | None, double_quant: bool, act: int, dtype: str = "auto"
) -> tuple[int, str]:
    """Bytes of the frozen base as loaded (and, when quantized, as prepared for k-bit training: lora_tune.model.kbit
    keeps bfloat16 embeddings, LM head and norms in bfloat16, and casts float16 ones to float32)."""
    linears = shape.decoder_linears()
    biases = sum(m.out_features for m in linears if m.bias)
    rest = shape.embedding_numel + (0 if shape.tied_embeddings else shape.lm_head.weight_numel) + shape.norm_numel
    if bits is None:
        total_numel = sum(m.weight_numel for m in linears) + biases + rest
        return act * total_numel, f"{shape.parameter_count() / 1e9:.2f}B params in {'fp32' if act == 4 else 'bf16'}"
    quantized = sum(quantized_weight_bytes(m.weight_numel, bits, double_quant, m.out_features) for m in linears)
    frozen = 4 if act == 4 or dtype == "float16" else 2
    unquantized = frozen * (rest + biases)
    kind = "NF4" + (" + double-quant constants" if double_quant else "") if bits == 4 else "int8 + row scales"
    named = "fp32" if frozen == 4 else "bf16"
    return quantized + unquantized, f"{kind}; embeddings, LM head, norms in {named} ({unquantized / GIB:.2f} GiB)"


def trainable_bytes(recipe: Recipe, act: int) -> int:
    """Bytes per trainable parameter (and per gradient): TRL's trainers cast the adapter of a quantized base to
    bfloat16 (the QLoRA paper's setting); transformers' Trainer (classification) and unquantized bases keep fp32."""
    trl_trainer = recipe.run_kind != "classification"
    return 2 if recipe.quantization.bits is not None and act == 2 and trl_trainer else 4


def tiles_mlp(recipe: Recipe, shape: ModelShape) -> bool:
    """Whether the run tiles its MLPs (lora_tune.model.tiling decides it the same way at load time)."""
    return resolve_tiled_mlp(recipe.training, shape.model_type).value == "on"


def quantized_weight_bytes(numel: int, bits: int | None, double_quant: bool, out_features: int) -> int:
    """Storage of one bitsandbytes-quantized weight, every tensor its layer holds (codes included)."""
    if bits == 8:
        return numel + 4 * out_features  # int8 weight + fp32 absmax per output row (SCB)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    blocks = -(-numel // BLOCK_4BIT)
    packed = -(-numel // 2)
    code = 16 * 4  # the 16-value NF4/FP4 lookup table
    if not double_quant:
        return packed + 4 * blocks + code
    nested = -(-blocks // NESTED_BLOCK)
    return packed + blocks + 4 * nested + 4 + 256 * 4 + code  # uint8 absmax, fp32 scales, offset, 8-bit code


def optimizer_bytes(optimizer: str, numels: list[int]) -> tuple[int, str]:
    if optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        return 8 * sum(numels), "AdamW: 2 fp32 states per param" + (" (paged)" if "paged" in optimizer else "")
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0
        for n in numels:
            total += 2 * (n + 4 * -(-n // BLOCK_8BIT_OPTIM)) if n >= MIN_8BIT_OPTIM_SIZE else 8 * n
        return total, "8-bit AdamW: 2 uint8 states per param + block scales" + (
            " (paged)" if "paged" in optimizer else ""
        )
    if optimizer == "adafactor":
        return 4 * sum(numels), "Adafactor: factored second moment (upper bound: one fp32 per param)"
    return 0, "SGD without momentum: no state"


def activation_bytes(
    recipe: Recipe, shape: ModelShape, act: int, tokens: int, residual: int | None = None
) -> tuple[int, int]:
    """(activations kept for backward at the end of the forward, one layer's full activations). `residual`: bytes
    per element of the residual stream, the checkpointed layer inputs (float32 when frozen embeddings are)."""
    residual = residual or act
    per_layer = layer_activation_bytes_per_token(recipe, shape, act)
    final_norm = (4 + act) * shape.hidden_size
    layer = per_layer * tokens
    if tiles_mlp(recipe, shape):
        # The MLP's intermediates exist for one tile at a time; the tiles' outputs are joined (one hidden-size copy).
        mlp = mlp_tile_bytes_per_token(recipe, shape, act)
        tile = min(tokens, tile_tokens(shape.hidden_size))
        layer = (per_layer - mlp) * tokens + mlp * tile + act * shape.hidden_size * tokens
    if recipe.training.activation_offloading:  # saved tensors go to CPU RAM; about one layer's stay in flight
        kept = layer if not recipe.training.gradient_checkpointing else residual * shape.hidden_size * tokens
        return kept + final_norm * tokens, layer if recipe.training.gradient_checkpointing else 0
    if recipe.training.gradient_checkpointing:
        kept = shape.num_layers * residual * shape.hidden_size + final_norm
        return kept * tokens, layer
    return shape.num_layers * layer + final_norm * tokens, 0


def layer_activation_bytes_per_token(recipe: Recipe, shape: ModelShape, act: int) -> int:
    """Bytes one decoder layer keeps for its backward, per token (see the module docstring for the list)."""
    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q_dim = shape.num_heads * hd
    # SDPA gets k/v repeated to every query head when an attention mask is present (padded batches); packed rows
    # (no mask) and flash-attention use grouped-query attention as is.
    native_gqa = recipe.training.packing or recipe.model.attn_implementation.startswith("flash")
    kv_dim = (shape.num_kv_heads if native_gqa else shape.num_heads) * hd
    liger = recipe.training.liger  # Liger's RMSNorm keeps its input in the compute dtype; its SwiGLU recomputes silu
    total = 2 * (act if liger else 4 + act) * h  # two RMSNorms: input (fp32 upcast) + normalised output
    total += act * (2 * q_dim + 2 * kv_dim)  # SDPA saves q, k, v and its output
    total += (2 if liger else 3) * act * i  # gated MLP: gate output, act(gate), up output
    adapter = recipe.adapter
    layer0 = [m for m in lora_targets(shape, adapter) if m.name.startswith("model.layers.0.")]
    groups: set[str] = set()  # saved inputs, by the tensor they are (q/k/v share one, gate/up share one)
    for m in layer0:
        if adapter.dropout > 0:  # each adapted layer has its own dropout: output + mask per layer
            total += (act + 1) * m.in_features
        else:
            groups.add(_input_group(m.name))
        total += act * adapter.r  # lora_B's input
    if recipe.quantization.bits == 8:  # bitsandbytes' int8 matmul keeps its input for backward
        groups |= {_input_group(m.name) for m in shape.decoder_linears()[:7]}
    total += act * sum(_input_width(shape, g) for g in groups)
    if recipe.model.attn_implementation == "eager":  # softmax probabilities per head over the row, fp32 softmax
        total += shape.num_heads * (recipe.training.max_length or 2048) * (act + 4)
    return total


def mlp_tile_bytes_per_token(recipe: Recipe, shape: ModelShape, act: int) -> int:
    """The part of layer_activation_bytes_per_token a tiled MLP holds for one tile only: its intermediates, the
    adapted projections' dropout copies and lora_B inputs, down_proj's input. The MLP's input (the tiles' inputs)
    is kept whole."""
    i = shape.intermediate_size
    total = (2 if recipe.training.liger else 3) * act * i
    adapter = recipe.adapter
    mlp = [m for m in lora_targets(shape, adapter) if m.name.startswith("model.layers.0.mlp.")]
    down_saved = recipe.quantization.bits == 8
    for m in mlp:
        if adapter.dropout > 0:
            total += (act + 1) * m.in_features
        elif _input_group(m.name) == "down_proj":
            down_saved = True
        total += act * adapter.r
    if down_saved:
        total += act * i
    return total


def _input_group(name: str) -> str:
    """Layers that read the same tensor share one saved input."""
    last = name.rsplit(".", 1)[-1]
    return {
        "q_proj": "attn_in",
        "k_proj": "attn_in",
        "v_proj": "attn_in",
        "gate_proj": "mlp_in",
        "up_proj": "mlp_in",
    }.get(last, last)


def _input_width(shape: ModelShape, group: str) -> int:
    return {"o_proj": shape.num_heads * shape.head_dim, "down_proj": shape.intermediate_size}.get(
        group, shape.hidden_size
    )


def logits_bytes(shape: ModelShape, act: int, tokens: int) -> int:
    """TRL's chunked LM head: one (4,096 x 32,768) tile, the LM head slice in compute dtype, fp32 grads of hidden."""
    tile = act * min(tokens, LOGPROB_TOKEN_CHUNK) * min(shape.vocab_size, LOGPROB_VOCAB_CHUNK)
    weight_slice = act * min(shape.vocab_size, LOGPROB_VOCAB_CHUNK) * shape.hidden_size
    hidden = (act + 4) * tokens * shape.hidden_size  # gathered hidden states + fp32 gradient accumulator
    return tile + weight_slice + hidden + 8 * tokens * 4  # + per-token fp32 statistics


def full_logits_bytes(shape: ModelShape, act: int, tokens: int) -> int:
    """transformers' own loss: the (tokens x vocab) logits in the compute dtype, their float32 copy and gradient."""
    return (act + 4 + 4) * tokens * shape.vocab_size + (act + 4) * tokens * shape.hidden_size


def plan(
    recipe: Recipe, *, config: str | Path | None = None, gpu_memory: str | None = None, offline: bool = False
) -> MemoryPlan:
    """The recipe's memory plan against a GPU size (given, read from nvidia-smi, or 24 GiB assumed)."""
    budget, budget_source = resolve_gpu_memory(gpu_memory)
    raw, source = read_model_config(recipe.model, config, offline=offline)
    shape = shape_from_config(raw)
    parts, details, params, paged = estimate(recipe, shape)
    t = recipe.training
    result = MemoryPlan(
        model=recipe.model.name,
        config_source=source,
        shape=shape,
        tokens_per_step=tokens_per_step(recipe, shape),
        parts=parts,
        details=details,
        trainable_parameters=params,
        gpu_memory=budget,
        gpu_memory_source=budget_source,
        paged_bytes=paged,
    )
    if not shape.known_layout:
        result.notes.append(f"model_type '{shape.model_type}' is estimated with the Llama layout; check the figures")
    _add_vision(result, recipe, raw)
    if t.max_length is None:
        result.notes.append("training.max_length is null: tokens per step assume the model's context length")
    if not result.fits:
        result.suggestions = suggestions(recipe, shape, budget)
    return result


def _add_vision(result: MemoryPlan, recipe: Recipe, raw: dict[str, Any]) -> None:
    """A vision-language base: its tower and projector in the model dtype (never 4-bit), the image tokens per
    picture that each row's max_length must hold (lora_tune.plan.vision)."""
    vision = vision_shape(raw)
    if vision is None:
        return
    width = 2 if recipe.model.dtype in ("auto", "bfloat16", "float16") else 4
    weights = (vision.tower_parameters + vision.projector_parameters) * width
    result.parts = {"vision tower + projector": weights, **result.parts}
    result.details["vision tower + projector"] = (
        f"{vision.tower_parameters:,} + {vision.projector_parameters:,} params in the model dtype (not quantized)"
    )
    result.notes.append(f"vision: {vision.how}; they count in training.max_length")


def suggestions(recipe: Recipe, shape: ModelShape, budget: int) -> list[tuple[str, list[str], int]]:
    """Recipe changes that bring the estimate under `budget`, cheapest in quality first: each lever that keeps every
    token alone, else all of them together; then shorter rows (truncation); else everything at once."""
    keeping = [(what, c) for what, c in _keeping_options(recipe, shape) if valid_changes(recipe, c)]
    truncating = [(what, c) for what, c in _truncating_options(recipe) if valid_changes(recipe, c)]
    found = [fit for fit in (_fitting(recipe, shape, budget, what, c) for what, c in keeping) if fit]
    if not found:  # no lever fits alone: all of them together, before any truncation; the step's shape last
        same_shape = [o for o in keeping if "training.batch_size" not in o[1]]
        found += _cumulative(recipe, shape, budget, same_shape + [o for o in keeping if o not in same_shape], TOGETHER)
    found += [fit for fit in (_fitting(recipe, shape, budget, what, c) for what, c in truncating) if fit]
    if not found:  # nothing alone: every change, each on top of the last, until the run fits
        found += _cumulative(recipe, shape, budget, keeping + truncating, "all of these together")
    return found[:4]


def _keeping_options(recipe: Recipe, shape: ModelShape) -> list[tuple[str, dict[str, object]]]:
    """Changes that keep every token of every row, cheapest in quality first."""
    t = recipe.training
    options: list[tuple[str, dict[str, object]]] = []
    if not t.gradient_checkpointing:
        options.append(("turn on gradient checkpointing", {"training.gradient_checkpointing": True}))
    batch = t.batch_size
    while batch > 1:
        batch //= 2
        accumulation = t.gradient_accumulation_steps * t.batch_size // batch
        options.append(
            (
                f"batch {batch} x {accumulation} accumulation (same effective batch)",
                {"training.batch_size": batch, "training.gradient_accumulation_steps": accumulation},
            )
        )
    if recipe.quantization.bits != 4:
        options.append(("load the base in 4-bit (QLoRA)", {"quantization.bits": 4}))
    if t.optimizer in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        options.append(("8-bit paged AdamW", {"training.optimizer": "paged_adamw_8bit"}))
    # Levers that keep every token (docs/speed-and-memory.md), each for some time:
    if recipe.model.attn_implementation == "eager":
        options.append(("SDPA / flash attention instead of eager", {"model.attn_implementation": "auto"}))
    if not tiles_mlp(recipe, shape) and not t.liger:
        options.append(("tiled MLP (one more MLP forward per layer)", {"training.tiled_mlp": True}))
    if not t.activation_offloading and honours(recipe.run_kind, "training.activation_offloading"):
        options.append(("offloaded checkpoints (layer inputs in CPU RAM)", {"training.activation_offloading": True}))
    return options


def _truncating_options(recipe: Recipe) -> list[tuple[str, dict[str, object]]]:
    options: list[tuple[str, dict[str, object]]] = []
    length = recipe.training.max_length or 0
    while length > 256:
        length //= 2
        options.append((f"max_length {length} (longer examples are truncated)", {"training.max_length": length}))
    return options


def _cumulative(
    recipe: Recipe, shape: ModelShape, budget: int, options: list[tuple[str, dict[str, object]]], what: str
) -> list[tuple[str, list[str], int]]:
    """The first prefix of `options`, applied each on top of the last, that fits; [] when none does."""
    combined: dict[str, object] = {}
    for _, changes in options:
        combined.update(changes)
        fit = _fitting(recipe, shape, budget, what, dict(combined))
        if fit:
            return [fit]
    return []


TOGETHER = "together, every token kept"


def _fitting(
    recipe: Recipe, shape: ModelShape, budget: int, what: str, changes: dict[str, object]
) -> tuple[str, list[str], int] | None:
    """(what, its overrides, the planned peak) when `changes` bring the recipe under `budget`, else None."""
    peak = sum(estimate(_with_changes(recipe, changes), shape)[0].values())
    if peak > budget:
        return None
    return what, [f"{k}={_yaml(v)}" for k, v in changes.items()], peak


def valid_changes(recipe: Recipe, changes: dict[str, object]) -> bool:
    """Whether the recipe rules accept the recipe with `changes` (an RL batch must hold whole groups)."""
    try:
        _with_changes(recipe, changes)
    except ValueError:  # pydantic's ValidationError
        return False
    return True


def _with_changes(recipe: Recipe, changes: dict[str, object]) -> Recipe:
    data = recipe.model_dump()
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        data[section][key] = value
    return Recipe.model_validate(data)


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|G|MiB|MB|M)?\s*$", re.IGNORECASE)


def gib_label(size: int) -> str:
    """A GPU size as the user wrote it: '24 GiB', '7.4 GiB' (not rounded to a whole GiB)."""
    return f"{round(size / GIB, 2):g} GiB"


def parse_size(text: str) -> int:
    """'24GiB', '24 GB', '24G' or '24' (GiB) -> bytes. GB is read as GiB, as GPU vendors label their cards."""
    match = SIZE.match(text)
    if not match:
        raise PlanOptionError("gpu_memory", f"expected a size such as 24GiB or 80GB, got '{text}'")
    number, unit = float(match.group(1)), (match.group(2) or "GiB").lower()
    return int(number * (GIB if unit.startswith("g") else 1024**2))


def resolve_gpu_memory(text: str | None) -> tuple[int, str]:
    if text is not None:
        return parse_size(text), "--gpu-memory"
    detected = nvidia_smi_memory()
    if detected is not None:
        return detected, "nvidia-smi (GPU 0)"
    return 24 * GIB, "assumed (no GPU found; pass --gpu-memory)"


def nvidia_smi_memory() -> int | None:
    """Total memory of GPU 0 from nvidia-smi, without importing torch; None without a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return int(float(out.splitlines()[0])) * 1024**2
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def format_plan(p: MemoryPlan) -> str:
    s = p.shape
    lines = [
        f"Memory plan for {p.model}  (config: {p.config_source})",
        f"  {s.model_type}: {s.parameter_count() / 1e9:.2f}B params, {s.num_layers} layers, hidden {s.hidden_size}, "
        f"vocab {s.vocab_size:,}; {p.trainable_parameters:,} trainable",
        "",
    ]
    width = max(len(k) for k in p.parts)
    for name, value in p.parts.items():
        lines.append(f"  {name:<{width}}  {value / GIB:7.2f} GiB   {p.details[name]}")
    lines.append(f"  {'peak (estimate)':<{width}}  {p.total / GIB:7.2f} GiB")
    if p.paged_bytes:
        lines.append(f"  ({p.paged_bytes / GIB:.2f} GiB of it is paged optimizer state, which can spill to CPU RAM)")
    verdict = "fits" if p.fits else "does NOT fit"
    lines += ["", f"{verdict} in {gib_label(p.gpu_memory)} ({p.gpu_memory_source})"]
    if not p.fits:
        if p.suggestions:
            lines.append("Changes that would make it fit (each line alone):")
            for what, overrides, peak in p.suggestions:
                lines.append(f"  {what}: {' '.join(overrides)}  -> {peak / GIB:.2f} GiB")
        else:
            lines.append("No recipe change the planner knows makes it fit: use a smaller model or a larger GPU.")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def planned_peak_memory(recipe: Recipe) -> str | None:
    """The recipe's planned peak GPU memory on a 24 GiB GPU as text (e.g. '17.3 GiB'); None when its model's
    config.json is not at hand offline (the catalog listing never asks the hub)."""
    try:
        return f"{plan(recipe, gpu_memory='24GiB', offline=True).total / GIB:.1f} GiB"
    except PlanError:
        return None
