"""The memory levers of a run, priced: what each saves at the recipe's shape, what it costs in time, and the longest
context (one row, or one group of an RL run's completions, per forward pass) that fits a GPU with the recipe as it is
and with the levers on.

Levers (docs/speed-and-memory.md):
- bf16 frozen weights: a quantized base's embeddings, LM head and norms stay bfloat16 (lora_tune.model.kbit); priced
  against peft's float32 cast, which also makes the residual stream, and so every checkpointed layer input, float32.
- chunked loss: TRL's chunked LM head, against transformers' loss over the whole float32 logits.
- SDPA / flash attention (`model.attn_implementation: auto`): no (tokens x tokens) scores, against eager attention.
- gradient checkpointing (`training.gradient_checkpointing`): each layer keeps only its input.
- tiled MLP (`training.tiled_mlp`, lora_tune.model.tiling): one layer's MLP working set for one tile only.
- offloaded checkpoints (`training.activation_offloading`): the layer inputs wait in CPU RAM.
Time costs are arithmetic, not measurements: FLOPs of one step with a frozen base (forward, the recompute when
checkpointing, backward: input gradients of the frozen matmuls, 2 x the attention), and bytes over PCIe for
offloading (25 GB/s each way, PCIe 4.0 x16; overlapped with compute where the trainer can). Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_tune.plan.memory import (
    FULL_LOGITS,
    GIB,
    UPCAST,
    _with_changes,
    estimate,
    format_plan,
    gib_label,
    plan,
    tiles_mlp,
)
from lora_tune.plan.shape import ModelShape
from lora_tune.recipe.rules import RL_OBJECTIVES, honours
from lora_tune.recipe.schema import Recipe

PCIE_BYTES_PER_S = 25e9
CONTEXT_STEP = 1024  # the longest context is searched in multiples of this many tokens
MAX_CONTEXT = 1 << 21
LONG_CONTEXT = {  # the levers `new` and `plan` turn on for a long context
    "training.batch_size": 1,
    "training.gradient_checkpointing": True,
    "training.tiled_mlp": True,
    "training.activation_offloading": True,
}


@dataclass(frozen=True)
class Lever:
    name: str
    key: str | None  # the recipe key that turns it on (None: always on)
    on: bool  # on in this recipe
    without: int  # planned peak without it (bytes)
    with_it: int  # planned peak with it
    time: str  # its cost in time


def peak(recipe: Recipe, shape: ModelShape, without: frozenset[str] = frozenset()) -> int:
    return sum(estimate(recipe, shape, without)[0].values())


def step_flops(recipe: Recipe, shape: ModelShape) -> tuple[float, float, float]:
    """(forward, MLP forward, backward) FLOPs of one forward pass's tokens, frozen base (input gradients only)."""
    tokens = recipe.training.batch_size * (recipe.training.max_length or 2048)
    linears = shape.decoder_linears()
    mlp = sum(m.weight_numel for m in linears if ".mlp." in m.name)
    others = sum(m.weight_numel for m in linears) - mlp + shape.lm_head.weight_numel
    row = recipe.training.max_length or 2048
    attention = shape.num_layers * 2 * row * shape.num_heads * shape.head_dim  # causal QK^T and AV, per token
    forward = tokens * (2 * (mlp + others) + attention)
    return forward, tokens * 2 * mlp, tokens * (2 * (mlp + others) + 2 * attention)


def time_costs(recipe: Recipe, shape: ModelShape) -> dict[str, str]:
    forward, mlp, backward = step_flops(recipe, shape)
    checkpointed = recipe.training.gradient_checkpointing
    step = forward * (2 if checkpointed else 1) + backward
    tokens = recipe.training.batch_size * (recipe.training.max_length or 2048)
    offloaded = shape.num_layers * tokens * shape.hidden_size * 2  # bf16 layer inputs, each way
    return {
        "bf16 frozen weights": "none (no float32 copies to cast)",
        "chunked loss": "none (the same matmuls, in tiles)",
        "SDPA / flash attention": "faster than eager",
        "gradient checkpointing": f"+{forward / (forward + backward):.0%} FLOPs (one more forward)",
        "tiled MLP": f"+{mlp / step:.0%} FLOPs (one more MLP forward per layer)",
        "offloaded checkpoints": f"{offloaded / GIB:.1f} GiB to CPU RAM and back per step "
        f"({2 * offloaded / PCIE_BYTES_PER_S:.1f} s at 25 GB/s, partly overlapped)",
    }


def levers(recipe: Recipe, shape: ModelShape) -> list[Lever]:
    """Each lever's planned peak without and with it, at the recipe's shape, and its time cost."""
    t = recipe.training
    here = peak(recipe, shape)
    costs = time_costs(recipe, shape)
    rows: list[Lever] = []
    if recipe.quantization.bits is not None and recipe.model.dtype in ("auto", "bfloat16"):
        rows.append(Lever("bf16 frozen weights", None, True, peak(recipe, shape, frozenset({UPCAST})), here, ""))
    rows.append(Lever("chunked loss", None, True, peak(recipe, shape, frozenset({FULL_LOGITS})), here, ""))

    def toggled(name: str, key: str, on: bool, off_value: object, on_value: object) -> Lever | None:
        if not honours(recipe.run_kind, key):
            return None  # a setting this run does not honour (validate refuses it): no lever here
        other = peak(_with_changes(recipe, {key: off_value if on else on_value}), shape)
        return Lever(name, key, on, other if on else here, here if on else other, "")

    eager = recipe.model.attn_implementation == "eager"
    rows.append(toggled("SDPA / flash attention", "model.attn_implementation", not eager, "eager", "auto"))
    rows.append(
        toggled("gradient checkpointing", "training.gradient_checkpointing", t.gradient_checkpointing, False, True)
    )
    rows.append(toggled("tiled MLP", "training.tiled_mlp", tiles_mlp(recipe, shape), False, True))
    rows.append(
        toggled("offloaded checkpoints", "training.activation_offloading", t.activation_offloading, False, True)
    )
    return [Lever(r.name, r.key, r.on, r.without, r.with_it, costs[r.name]) for r in rows if r is not None]


def longest_context(recipe: Recipe, shape: ModelShape, budget: int, changes: dict[str, object] | None = None) -> int:
    """The longest max_length (a multiple of CONTEXT_STEP) whose one-row step fits `budget`, with `changes` applied;
    0 when not even CONTEXT_STEP tokens fit."""

    def fits(length: int) -> bool:
        candidate = {**(changes or {}), "training.max_length": length, **one_row(recipe)}
        return peak(_with_changes(recipe, candidate), shape) <= budget

    low, high = 0, MAX_CONTEXT // CONTEXT_STEP
    if fits(high * CONTEXT_STEP):
        return high * CONTEXT_STEP
    while high - low > 1:  # fits(low * step) holds (or low == 0), fits(high * step) does not
        middle = (low + high) // 2
        if fits(middle * CONTEXT_STEP):
            low = middle
        else:
            high = middle
    return low * CONTEXT_STEP


def one_row(recipe: Recipe) -> dict[str, object]:
    """The smallest batch the run can take: one row, or for an online RL run one group of completions."""
    if recipe.training.objective not in RL_OBJECTIVES:
        return {"training.batch_size": 1}
    return {"training.batch_size": recipe.rl.num_generations}


def long_context_changes(recipe: Recipe, shape: ModelShape) -> dict[str, object]:
    """The lever settings `plan` and `new` propose for a long context, where they differ from the recipe."""
    wanted = {k: v for k, v in LONG_CONTEXT.items() if honours(recipe.run_kind, k)}
    wanted.update(one_row(recipe))
    if recipe.model.attn_implementation == "eager":
        wanted["model.attn_implementation"] = "auto"
    if recipe.training.liger:  # tiling and Liger's SwiGLU exclude each other
        wanted.pop("training.tiled_mlp")
    current = recipe.model_dump()
    return {k: v for k, v in wanted.items() if current[k.split(".")[0]][k.split(".")[1]] != v}


def format_levers(recipe: Recipe, shape: ModelShape, budget: int) -> list[str]:
    """The lever table and the longest context, as `plan` prints them."""
    rows = levers(recipe, shape)
    width = max(len(r.name) for r in rows)
    lines = ["", "Levers at this shape (planned peak without -> with; time cost):"]
    for r in rows:
        state = "on " if r.on else "off"
        key = "always on" if r.key is None else r.key
        lines.append(
            f"  {state} {r.name:<{width}}  {r.without / GIB:6.2f} -> {r.with_it / GIB:6.2f} GiB  {r.time}  [{key}]"
        )
    as_is = longest_context(recipe, shape, budget)
    changes = long_context_changes(recipe, shape)
    unit = "one group of completions" if recipe.training.objective in RL_OBJECTIVES else "one row"
    lines += ["", f"Longest context that fits in {gib_label(budget)} ({unit} per forward pass):"]
    batch = one_row(recipe)["training.batch_size"]
    lines.append(f"  as the recipe is (batch {batch}): {as_is:,} tokens")
    if changes:
        levered = longest_context(recipe, shape, budget, changes)
        overrides = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items())
        lines.append(f"  with the long-context levers: {levered:,} tokens  ({overrides} training.max_length=N)")
    limit = shape.max_position_embeddings
    if limit and max(as_is, longest_context(recipe, shape, budget, changes)) > limit:
        lines.append(f"  (the model was trained to {limit:,} positions; longer rows need its RoPE scaling)")
    return lines


def plan_report(
    recipe: Recipe, *, config: str | None = None, gpu_memory: str | None = None, offline: bool = False
) -> str:
    """`lora-tune plan`'s whole answer: the memory plan, the levers priced, the longest context that fits."""
    result = plan(recipe, config=config, gpu_memory=gpu_memory, offline=offline)
    return "\n".join([format_plan(result), *format_levers(recipe, result.shape, result.gpu_memory)])
