"""Method keys and impossible combinations are refused at validation, with the key and what to do instead; the
resolved recipe of every method validates again. No torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.errors import RecipeError
from lora_tune.recipe.load import dump_resolved, load_recipe

BASE = """\
model: {{name: some/model}}
datasets: [{{path: some/hub-dataset}}]
output_dir: runs/x
"""


def load(tmp_path: Path, extra: str, overrides: tuple[str, ...] = ()) -> object:
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE.format() + extra)
    return load_recipe(path, list(overrides))


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("adapter: {method: ia3, r: 4}", "adapter.r", "does not apply to method ia3"),
        ("adapter: {method: full, target_modules: all-linear}", "adapter.target_modules", "method full"),
        ("adapter: {method: prompt_tuning, last_n_layers: 2}", "adapter.last_n_layers", "its keys: init_from"),
        ("adapter: {method: partial}", "adapter.last_n_layers", "trains nothing"),
        ("adapter: {method: adalora, r: 4, target_r: 8}\ntraining: {max_steps: 10}", "adapter.target_r", "exceed"),
        ("adapter: {method: adalora}", "training.max_steps", "AdaLoRA"),
        ("adapter: {method: adalora, tinit: 5, tfinal: 5}\ntraining: {max_steps: 10}", "adapter.tinit", "below"),
        (
            "adapter: {method: ia3, target_modules: [q_proj], feedforward_modules: [down_proj]}",
            "adapter.feedforward_modules",
            "not in target_modules",
        ),
        ("quantization: {bits: 4}\nadapter: {method: loha}", "quantization.bits", "no 4-bit"),
        ("quantization: {bits: 8}\nadapter: {method: lokr}", "quantization.bits", "no 8-bit"),
        ("quantization: {bits: 4}\nadapter: {method: full}", "quantization.bits", "cannot be trained"),
        ("quantization: {bits: 8}\nadapter: {method: partial, last_n_layers: 1}", "quantization.bits", "partial"),
        ("quantization: {bits: 4}\nadapter: {init: pissa}", "adapter.init", "unquantized base"),
        ("quantization: {bits: 8}\nadapter: {init: olora}", "adapter.init", "unquantized base"),
        ("adapter: {init: loftq}", "adapter.init", "bits: 4"),
        ("quantization: {bits: 8}\nadapter: {init: loftq}", "adapter.init", "bits: 4"),
        ("adapter: {method: prefix_tuning}", "training.gradient_checkpointing", "prefix_tuning"),
        ("adapter: {init_from: runs/a, r: 4}", "adapter.r", "init_from"),
        ("adapter: {init: pissa, use_rslora: true, rank_pattern: {q_proj: 4}}", "adapter.init", "plain LoRA"),
        ("task: {type: classification, labels: [pos]}", "task.labels", "two distinct"),
        ("task: {labels: [a, b]}", "task.labels", "classification only"),
        (
            "task: {type: classification, labels: [a, b]}\nadapter: {method: p_tuning}",
            "adapter.method",
            "not offered for classification",
        ),
    ],  # fmt: skip
)
def test_refused_with_key_and_reason(tmp_path: Path, extra: str, key: str, words: str):
    with pytest.raises(RecipeError) as err:
        load(tmp_path, extra)
    assert err.value.key == key and words in str(err.value), str(err.value)
    assert err.value.line is not None  # points at the recipe line


@pytest.mark.parametrize(
    "extra",
    [
        "adapter: {method: lora, r: 8, init: gaussian, loraplus_lr_ratio: 16, rank_pattern: {down_proj: 4}}",
        "quantization: {bits: 8}\nadapter: {method: lora, use_dora: true}",
        "quantization: {bits: 4}\nadapter: {method: lora, init: loftq}",
        "quantization: {bits: 4}\nadapter: {method: ia3}",
        "quantization: {bits: 4}\nadapter: {method: adalora, r: 8, target_r: 4}\ntraining: {max_steps: 100}",
        "adapter: {method: loha, r: 4, alpha: 8}",
        "adapter: {method: lokr, r: 4, alpha: 8}",
        "quantization: {bits: 4}\nadapter: {method: prompt_tuning, num_virtual_tokens: 4, prompt_init_text: hi}",
        "adapter: {method: prefix_tuning}\ntraining: {gradient_checkpointing: false}",
        "adapter: {method: p_tuning, encoder_hidden_size: 64}",
        "adapter: {method: partial, last_n_layers: 2, modules: [lm_head, norm]}",
        "adapter: {method: full}",
        "adapter: {init_from: runs/first, loraplus_lr_ratio: 4}",
        "task: {type: classification, labels: [neg, pos]}\nadapter: {method: full}",
    ],
)
def test_valid_methods_round_trip_through_the_resolved_recipe(tmp_path: Path, extra: str):
    recipe = load(tmp_path, extra)
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_resolved(recipe))
    again = load_recipe(resolved)
    assert again == recipe
    # The resolved recipe lists only the keys the method reads.
    from lora_tune.recipe.rules import CONTINUE_KEYS, METHOD_KEYS

    allowed = CONTINUE_KEYS if recipe.adapter.init_from else METHOD_KEYS[recipe.adapter.method] | {"method"}
    assert set(recipe.model_dump(mode="json")["adapter"]) <= allowed


def test_peft_config_mapping():
    """Each method's recipe keys land in the right peft option (peft imported, no model built)."""
    from lora_tune.methods.peft_config import build_peft_config
    from lora_tune.recipe.schema import AdapterConfig

    lora = build_peft_config(
        AdapterConfig(r=8, alpha=16, init="gaussian", rank_pattern={"down_proj": 4}, target_modules=r".*\.v_proj")
    )
    assert (lora.r, lora.lora_alpha, lora.init_lora_weights, lora.rank_pattern) == (
        8,
        16,
        "gaussian",
        {"down_proj": 4},
    )
    assert lora.target_modules == r".*\.v_proj"
    ada = build_peft_config(AdapterConfig(method="adalora", r=12, target_r=4, delta_t=5), total_steps=50)
    assert (ada.init_r, ada.target_r, ada.deltaT, ada.total_step) == (12, 4, 5, 50)
    prompt = build_peft_config(
        AdapterConfig(method="prompt_tuning", num_virtual_tokens=4, prompt_init_text="hi"), tokenizer="tok"
    )
    assert (prompt.num_virtual_tokens, prompt.prompt_tuning_init, prompt.tokenizer_name_or_path) == (4, "TEXT", "tok")
    assert build_peft_config(AdapterConfig(method="ia3", target_modules=["v_proj"])).peft_type.value == "IA3"
    assert build_peft_config(AdapterConfig(method="lora"), task_type="SEQ_CLS").task_type == "SEQ_CLS"
    assert build_peft_config(AdapterConfig(method="full")) is None


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_packing_turns_itself_off_for_prompt_learning(tmp_path: Path, method: str):
    from lora_tune.data.packing import packing_plan, sft_packing_args

    recipe = load(
        tmp_path, f"adapter: {{method: {method}}}\ntraining: {{packing: true, gradient_checkpointing: false}}"
    )
    plan = packing_plan(recipe)
    assert not plan.enabled and "virtual tokens" in plan.reason
    assert sft_packing_args(recipe) == {"packing": False}
    assert packing_plan(load(tmp_path, "adapter: {method: lora}")).enabled  # the default packs otherwise
