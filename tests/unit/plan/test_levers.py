"""The planner's long-context levers: each priced at the recipe's shape, the longest context that fits, and the
issue-34 targets for Llama 3.1 8B QLoRA (by the planner; the GPU stage of scripts/gpu_check.sh measures them)."""

from __future__ import annotations

import pytest

from lora_tune.model.tiling import TILE_TOKENS
from lora_tune.plan.levers import (
    CONTEXT_STEP,
    levers,
    long_context_changes,
    longest_context,
    peak,
    plan_report,
)
from lora_tune.plan.memory import FULL_LOGITS, GIB, UPCAST, _with_changes, estimate, plan
from lora_tune.recipe.load import load_recipe

LLAMA = "recipes/llama/llama-3.1-8b-instruct-qlora-chat.yaml"
UNSLOTH_24GB = 78_475  # unsloth's Llama 3.1 8B QLoRA context on 24 GB (r=32 all-linear, batch 1)
TORCHTUNE_2X2048 = 7.4  # GiB, torchtune's Llama 3.1 8B QLoRA on an RTX 4090, batch 2 packed to 2,048


@pytest.fixture(scope="module")
def llama():
    recipe = load_recipe(LLAMA, [], check_paths=False)
    return recipe, plan(recipe, gpu_memory="24GiB", offline=True).shape


def test_bf16_frozen_weights_halve_the_unquantized_weights_and_the_checkpointed_inputs(llama):
    recipe, shape = llama
    ours, _, _, _ = estimate(recipe, shape)
    peft, _, _, _ = estimate(recipe, shape, frozenset({UPCAST}))
    unquantized_bf16 = 2 * (shape.embedding_numel + shape.lm_head.weight_numel + shape.norm_numel)
    assert peft["weights"] - ours["weights"] == unquantized_bf16  # fp32 (4 bytes) against bf16 (2)
    assert peft["activations"] > 1.9 * ours["activations"]  # a float32 residual stream doubles the layer inputs
    float16 = _with_changes(recipe, {"model.dtype": "float16"})  # float16 bases keep peft's float32 cast
    assert estimate(float16, shape)[0]["weights"] == peft["weights"]


def test_the_tiled_mlp_leaves_one_tile_of_mlp_in_the_working_set(llama):
    recipe, shape = llama
    for length in (TILE_TOKENS, 16 * TILE_TOKENS):
        base = _with_changes(recipe, {"training.batch_size": 1, "training.max_length": length})
        untiled = estimate(_with_changes(base, {"training.tiled_mlp": False}), shape)[0]["backward working set"]
        tiled = estimate(_with_changes(base, {"training.tiled_mlp": True}), shape)[0]["backward working set"]
        if length == TILE_TOKENS:  # one tile: the same work, plus the joined output
            assert tiled == untiled + 2 * shape.hidden_size * length
        else:  # the MLP's share no longer grows with the sequence: at least 2/5 of the layer's working set gone
            assert tiled < 0.6 * untiled


def test_each_lever_row_saves_memory_and_names_its_cost(llama):
    recipe, shape = llama
    long = _with_changes(recipe, {"training.batch_size": 1, "training.max_length": 32768})
    rows = {r.name: r for r in levers(long, shape)}
    assert set(rows) == {
        "bf16 frozen weights",
        "chunked loss",
        "SDPA / flash attention",
        "gradient checkpointing",
        "tiled MLP",
        "offloaded checkpoints",
    }
    for row in rows.values():
        assert row.with_it < row.without, row.name
        assert row.time, row.name
    assert rows["tiled MLP"].on  # auto: 32,768 tokens in one forward pass
    assert not rows["offloaded checkpoints"].on
    assert rows["chunked loss"].without == peak(long, shape, frozenset({FULL_LOGITS}))
    assert rows["gradient checkpointing"].time.startswith("+") and "FLOPs" in rows["tiled MLP"].time


def test_longest_context_is_the_last_step_that_fits(llama):
    recipe, shape = llama
    budget = 24 * GIB
    for changes in ({}, long_context_changes(recipe, shape)):
        n = longest_context(recipe, shape, budget, changes)
        assert n % CONTEXT_STEP == 0 and n > 0

        def at(length: int, changes: dict = changes) -> int:
            return peak(
                _with_changes(recipe, {**changes, "training.max_length": length, "training.batch_size": 1}), shape
            )

        assert at(n) <= budget < at(n + CONTEXT_STEP)
    assert longest_context(recipe, shape, 4 * GIB) == 0  # the weights alone do not fit


def test_issue_34_targets_by_the_planner(llama):
    recipe, shape = llama
    # unsloth's setting: r=32 on every linear layer, no dropout, batch 1; our long-context levers on.
    unsloth = _with_changes(recipe, {"adapter.r": 32, "adapter.alpha": 32, "adapter.dropout": 0.0})
    assert longest_context(unsloth, shape, 24 * GIB, long_context_changes(unsloth, shape)) >= UNSLOTH_24GB
    # The catalog recipe itself (r=16, dropout 0.05) with the levers.
    assert longest_context(recipe, shape, 24 * GIB, long_context_changes(recipe, shape)) >= UNSLOTH_24GB
    # 2 x 2,048 with torchtune's adapter (r=8, no dropout) and the tiled MLP: what torch's allocator would hold.
    torchtune = _with_changes(
        recipe, {"adapter.r": 8, "adapter.alpha": 16, "adapter.dropout": 0.0, "training.tiled_mlp": True}
    )
    assert plan(torchtune, gpu_memory="24GiB", offline=True).allocated <= TORCHTUNE_2X2048 * GIB


def test_plan_report_prints_the_levers_and_the_longest_context(llama):
    recipe, _ = llama
    text = plan_report(recipe, gpu_memory="24GiB", offline=True)
    assert "Levers at this shape" in text and "[training.tiled_mlp]" in text
    assert "Longest context that fits in 24 GiB" in text
    assert "training.tiled_mlp=true training.activation_offloading=true" in text


def test_plan_suggests_the_levers_before_truncating(llama):
    recipe, _ = llama
    long = _with_changes(recipe, {"training.batch_size": 1, "training.max_length": 65536})
    result = plan(long, gpu_memory="24GiB", offline=True)
    assert not result.fits
    suggested = [what for what, _, _ in result.suggestions]
    assert any("offloaded checkpoints" in what for what in suggested), suggested


def test_catalog_recipe_at_2x2048_fits_torchtunes_figure_with_the_levers_plan_proposes(llama):
    recipe, _ = llama
    assert (recipe.training.batch_size, recipe.training.max_length) == (2, 2048)
    budget = f"{TORCHTUNE_2X2048}GiB"
    as_is = plan(recipe, gpu_memory=budget, offline=True)
    assert not as_is.fits
    first, overrides, peak_bytes = as_is.suggestions[0]
    # Every token kept and the step's shape unchanged: the levers, not a smaller batch or a truncation.
    assert "every token kept" in first and not any(o.startswith("training.batch_size") for o in overrides)
    levered = plan(load_recipe(LLAMA, overrides, check_paths=False), gpu_memory=budget, offline=True)
    # The whole planned peak (CUDA context and allocator slack included), not only what torch's allocator holds.
    assert levered.fits and levered.total == peak_bytes <= TORCHTUNE_2X2048 * GIB
    assert "does NOT fit in 7.4 GiB" in plan_report(recipe, gpu_memory=budget, offline=True)
