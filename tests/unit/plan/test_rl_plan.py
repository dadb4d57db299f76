"""The planner on an online RL recipe (grpo, rloo): a batch counts completions (one answer each, not a pair), the
sampling's KV cache counts where it exceeds the training pass, the reference forward only with a KL penalty, and the
levers and the longest context stay within what the run honours and validates."""

from __future__ import annotations

from pathlib import Path

from lora_tune.plan.levers import format_levers, levers
from lora_tune.plan.memory import GIB, estimate, plan, tokens_per_step
from lora_tune.recipe.load import load_recipe

GRPO = Path(__file__).parents[3] / "recipes" / "qwen" / "qwen2.5-1.5b-instruct-qlora-grpo-math.yaml"


def grpo(*overrides: str):
    return load_recipe(GRPO, list(overrides), check_paths=False)


def test_an_rl_batch_counts_completions_of_one_answer():
    recipe = grpo()
    shape = plan(recipe, offline=True).shape
    assert tokens_per_step(recipe, shape) == 8 * 1280  # a dpo batch of 8 would be 2 x 8 x 1280


def test_the_sampling_kv_cache_counts_when_it_exceeds_the_training_pass():
    shape = plan(grpo(), offline=True).shape
    small = estimate(grpo(), shape)[0]["generation KV cache"]
    wide = grpo("training.max_length=16384", "rl.steps_per_generation=16")  # 128 completions of 16k tokens at once
    kv = estimate(wide, shape)[0]["generation KV cache"]
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2  # K and V, bf16
    assert small == 0 and kv > 0.5 * 128 * 16384 * per_token
    assert kv < 128 * 16384 * per_token + 128 * 4 * shape.vocab_size


def test_the_reference_forward_counts_only_with_a_kl_penalty():
    shape = plan(grpo(), offline=True).shape
    assert "reference forward" not in estimate(grpo(), shape)[0]  # grpo's beta defaults to 0
    assert "reference forward" in estimate(grpo("rl.beta=0.04"), shape)[0]
    assert "reference forward" in estimate(grpo("training.objective=rloo"), shape)[0]  # rloo's beta: 0.05


def test_levers_and_the_longest_context_stay_within_what_the_run_validates():
    recipe = grpo()
    shape = plan(recipe, offline=True).shape
    assert "offloaded checkpoints" not in [lever.name for lever in levers(recipe, shape)]  # grpo does not honour it
    text = "\n".join(format_levers(recipe, shape, 24 * GIB))
    assert "as the recipe is (batch 8)" in text and "one group of completions per forward pass" in text
