"""The memory planner against what can be checked exactly on the CPU: real models built from the same config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_tune.errors import LoraTuneError
from lora_tune.plan.catalog import recipe_files
from lora_tune.plan.memory import GIB, parse_size, plan, quantized_weight_bytes
from lora_tune.plan.shape import PlanError, shape_from_config, trainable_parameters
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.schema import AdapterConfig

ROOT = Path(__file__).resolve().parents[3]
SMALL = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2}
CONFIGS = {
    "llama-gqa-untied": {"model_type": "llama", **SMALL, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2-tied-bias": {
        "model_type": "qwen2",
        **SMALL,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "qwen3-headdim-qknorm": {
        "model_type": "qwen3",
        **SMALL,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "tie_word_embeddings": False,
    },
}
ADAPTERS = {
    "all-linear": AdapterConfig(r=8),
    "list": AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]),
    "regex": AdapterConfig(r=2, target_modules=r".*\.layers\.1\..*(down|o)_proj"),
    "dora-bias": AdapterConfig(r=8, use_dora=True, bias="lora_only"),
    "save-lm_head": AdapterConfig(r=8, target_modules=["k_proj"], modules_to_save=["lm_head"], bias="all"),
}


def build(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**config)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_count_matches_a_model_built_from_the_config(name: str):
    model = build(CONFIGS[name])
    assert shape_from_config(CONFIGS[name]).parameter_count() == model.num_parameters()


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-tied-bias"])
def test_trainable_parameters_equal_peft(name: str, adapter: str):
    from peft import get_peft_model

    from lora_tune.methods.peft_config import build_peft_config

    cfg = ADAPTERS[adapter]
    model = get_peft_model(build(CONFIGS[name]), build_peft_config(cfg))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    planned = sum(n for _, n in trainable_parameters(shape_from_config(CONFIGS[name]), cfg))
    assert planned == real > 0


@pytest.mark.parametrize("double_quant", [True, False])
def test_four_bit_weight_bytes_equal_bitsandbytes_storage(tmp_path: Path, double_quant: bool):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build(CONFIGS["llama-gqa-untied"]).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    real = sum(_stored_bytes(m.weight) for m in layers)
    shape = shape_from_config(CONFIGS["llama-gqa-untied"])
    planned = sum(
        quantized_weight_bytes(m.weight_numel, 4, double_quant, m.out_features) for m in shape.decoder_linears()
    )
    assert planned == real


def _stored_bytes(weight) -> int:  # noqa: ANN001 - bnb Params4bit
    def nbytes(t) -> int:  # noqa: ANN001
        return t.numel() * t.element_size()

    state = weight.quant_state
    total = nbytes(weight.data) + nbytes(state.absmax) + nbytes(state.code)
    if state.nested:
        total += nbytes(state.offset) + nbytes(state.state2.absmax) + nbytes(state.state2.code)
    return total


def _tiny_recipe(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{name: {model_dir}}}\nquantization: {{bits: 4}}\ndatasets: [{{path: d.jsonl}}]\n"
        f"training: {{batch_size: 4, max_length: 256{extra}}}\noutput_dir: runs/x\n"
    )
    return recipe


def test_plan_reads_a_local_config_and_counts_what_the_adapter_trains(tmp_path: Path, tiny_model_dir: Path):
    result = plan(load_recipe(_tiny_recipe(tmp_path, tiny_model_dir), check_paths=False), gpu_memory="1GiB")
    model_cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert result.shape.hidden_size == model_cfg["hidden_size"] and result.tokens_per_step == 4 * 256
    # r=16 on all 7 linears of 2 layers (hidden 64, intermediate 256): r * (in + out) each
    per_layer = 16 * (4 * (64 + 64) + 2 * (64 + 256) + (256 + 64))
    assert result.trainable_parameters == 2 * per_layer == 47_104
    assert result.fits and result.total == sum(result.parts.values())


def test_more_tokens_and_no_checkpointing_cost_more_memory(tmp_path: Path, tiny_model_dir: Path):
    def peak(**changes) -> int:
        overrides = [f"training.{k}={v}" for k, v in changes.items()]
        recipe = load_recipe(_tiny_recipe(tmp_path, tiny_model_dir), overrides, check_paths=False)
        return plan(recipe, gpu_memory="1GiB").parts["activations"]

    base = peak()
    assert peak(batch_size=8) > base and peak(max_length=512) > base
    assert peak(gradient_checkpointing="false") > 2 * base


def test_suggestions_fit_when_applied():
    path = ROOT / "recipes/llama/llama-3.1-8b-instruct-qlora-chat.yaml"
    overrides = [
        "training.gradient_checkpointing=false",
        "training.batch_size=4",
        "training.gradient_accumulation_steps=4",
    ]
    result = plan(load_recipe(path, overrides, check_paths=False), gpu_memory="16GiB")
    assert not result.fits and result.suggestions
    for _, changes, peak in result.suggestions:
        again = plan(load_recipe(path, [*overrides, *changes], check_paths=False), gpu_memory="16GiB")
        assert again.fits and again.total == peak


RECIPES = recipe_files(ROOT / "recipes")  # skips data/, base/ parts, configs/ and accelerate/ launcher configs


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_plan_works_for_every_shipped_recipe_offline(path: Path, tiny_model_dir: Path, monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(path, check_paths=False)
    local = recipe.model.name.startswith(("runs/", ".", "/"))
    # A recipe whose base is built locally (the quickstart) is planned through --config before it is built.
    result = plan(recipe, config=tiny_model_dir if local and not Path(recipe.model.name).is_dir() else None)
    assert result.total > result.parts["weights"] > 0


def test_plan_verb_imports_no_torch_and_prints_the_breakdown():
    code = (
        "import sys; from lora_tune.cli import main; "
        "rc = main(['plan', 'recipes/llama/llama-3.1-8b-instruct-qlora-chat.yaml', '--gpu-memory', '12GiB']); "
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "NO-TORCH 0" in out and "peak (estimate)" in out and "fits in 12 GiB" in out


def test_unknown_local_model_is_one_line_error(tmp_path: Path, capsys):
    from lora_tune.cli import main

    recipe = _tiny_recipe(tmp_path, Path("runs/not-built"))
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "runs/not-built" in err and "--config" in err


def test_sizes():
    assert parse_size("24GiB") == 24 * GIB and parse_size("80 GB") == 80 * GIB and parse_size("512MiB") == GIB // 2
    with pytest.raises(LoraTuneError, match="^gpu_memory: expected a size"):
        parse_size("lots")


def test_a_config_without_shapes_is_refused():
    with pytest.raises(PlanError, match="hidden_size"):
        shape_from_config({"model_type": "llama"})
