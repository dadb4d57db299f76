"""`lora-tune new`: memory parsing, model sizes, the sizing rule, and recipes that validate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_tune.cli import main
from lora_tune.plan.catalog import CatalogError, shipped_config
from lora_tune.plan.memory import plan
from lora_tune.plan.new import model_shape, new_recipe, params_from_name, parse_memory, size_training
from lora_tune.plan.shape import ModelShape, shape_from_config
from lora_tune.recipe.load import load_recipe
from tests.conftest import fruit_rows, write_jsonl

CATALOG = Path(__file__).resolve().parents[3] / "recipes"


def shape(model: str) -> ModelShape:
    return shape_from_config(shipped_config(model, CATALOG))


@pytest.mark.parametrize(
    ("text", "gib"), [("24GiB", 24), ("24GB", 24), ("24 g", 24), ("80", 80), ("16384MiB", 16), ("7.5GiB", 7.5)]
)
def test_parse_memory(text: str, gib: float):
    assert parse_memory(text) == gib


@pytest.mark.parametrize("text", ["", "lots", "0GiB", "24TB"])
def test_parse_memory_refuses(text: str):
    with pytest.raises(CatalogError, match="^gpu_memory: expected a size"):
        parse_memory(text)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", 7e9),
        ("Qwen/Qwen2.5-0.5B", 5e8),
        ("HuggingFaceTB/SmolLM2-360M", 3.6e8),
        ("google/gemma-2-9b-it", 9e9),
        ("microsoft/Phi-3-mini-4k-instruct", None),
        ("a/model", None),
    ],
)
def test_params_from_name(name: str, params: float | None):
    assert params_from_name(name) == params


def test_model_shape_sources(tiny_model_dir: Path):
    local, source = model_shape(str(tiny_model_dir), CATALOG)
    assert (local.hidden_size, local.num_layers, source) == (64, 2, f"{tiny_model_dir / 'config.json'}")
    assert model_shape("Qwen/Qwen3-4B", CATALOG)[0] == shape("Qwen/Qwen3-4B")
    guessed, source = model_shape("someone/Custom-13B", CATALOG)
    assert guessed.parameter_count() == pytest.approx(13e9, rel=0.05) and "13B in its name" in source
    with pytest.raises(CatalogError, match="cannot tell the size"):
        model_shape("someone/custom", CATALOG)


def test_sizing_rule():
    llama = shape("meta-llama/Llama-3.1-8B-Instruct")
    on_24 = size_training(llama, "qlora", 24)
    assert on_24.gradient_checkpointing and on_24.max_length == 2048
    assert on_24.batch_size * on_24.gradient_accumulation_steps == 16
    on_16 = size_training(llama, "qlora", 16)
    assert on_16.batch_size < on_24.batch_size and not on_24.levers
    assert size_training(llama, "lora", 24).batch_size <= on_24.batch_size  # 16-bit weights leave less room
    with pytest.raises(CatalogError, match="too little .* use --method qlora"):
        size_training(llama, "lora", 16)
    small = size_training(shape("HuggingFaceTB/SmolLM2-360M-Instruct"), "lora", 80)
    assert not small.gradient_checkpointing and small.batch_size >= 4
    # The planner, one row: 7.4 GiB at 2048 tokens as is; 6.9 GiB with a tiled MLP and offloaded checkpoints.
    tight = size_training(llama, "qlora", 7.0)
    assert tight.max_length == 2048 and tight.batch_size == 1
    assert tight.levers == {"tiled_mlp": True, "activation_offloading": True}
    assert any("tiled MLP and offloaded checkpoints" in note for note in tight.notes)
    with pytest.raises(CatalogError, match="even with a tiled MLP"):
        size_training(llama, "qlora", 6)


def test_new_writes_the_levers_a_small_gpu_needs(tmp_path: Path):
    data = write_jsonl(tmp_path / "d.jsonl", fruit_rows(20, "messages"))
    path = tmp_path / "small.yaml"
    path.write_text(new_recipe("meta-llama/Llama-3.1-8B-Instruct", "qlora", str(data), "7GiB", CATALOG))
    recipe = load_recipe(path)
    assert recipe.training.tiled_mlp is True and recipe.training.activation_offloading
    assert recipe.training.max_length == 2048
    assert plan(recipe, gpu_memory="7GiB", offline=True).fits


@pytest.mark.parametrize("form", ["alpaca", "messages"])
def test_new_detects_the_format_and_validates(tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch):
    data = write_jsonl(tmp_path / "d.jsonl", fruit_rows(120, form))
    text = new_recipe("Qwen/Qwen2.5-7B-Instruct", "qlora", str(data), "24GiB", CATALOG)
    path = tmp_path / "my.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.datasets[0].format == form and recipe.quantization.bits == 4
    assert recipe.val_size == 0.05 and recipe.training.eval_strategy == "steps"
    assert recipe.training.optimizer == "paged_adamw_8bit"
    assert text.startswith("# QLoRA fine-tuning of Qwen/Qwen2.5-7B-Instruct")
    assert yaml.safe_load(text)["training"]["batch_size"] == recipe.training.batch_size


def test_new_lora_on_few_rows_has_no_validation(tmp_path: Path, alpaca_file: Path):
    text = new_recipe("Qwen/Qwen3-0.6B", "lora", str(alpaca_file), "24GiB", CATALOG)
    path = tmp_path / "my.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.quantization.bits is None and recipe.val_size == 0 and recipe.training.optimizer == "adamw_torch"
    assert recipe.output_dir == "runs/qwen3-0.6b-lora"


def test_new_cli_errors_are_one_line(tmp_path: Path, capsys):
    assert main(["new", "--model", "Qwen/Qwen3-4B", "--method", "qlora", "--data", str(tmp_path / "no.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error: --data: ")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer column"}\n')
    assert main(["new", "--model", "Qwen/Qwen3-4B", "--method", "qlora", "--data", str(bad)]) == 2
    assert "cannot detect the format" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "method", "gib"), [("Qwen/Qwen2.5-7B-Instruct", "qlora", 24), ("Qwen/Qwen3-4B", "lora", 40)]
)
def test_new_and_plan_share_one_memory_model(tmp_path: Path, model: str, method: str, gib: int):
    """The recipe `new` sizes is the one `plan` says fits: both read lora_tune.plan.memory.estimate."""
    data = write_jsonl(tmp_path / "d.jsonl", fruit_rows(120, "messages"))
    path = tmp_path / "new.yaml"
    path.write_text(new_recipe(model, method, str(data), f"{gib}GiB", CATALOG))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(shipped_config(model, CATALOG)))
    planned = plan(load_recipe(path), config=config, gpu_memory=f"{gib}GiB")
    assert planned.fits
    assert f"planned peak ~{planned.total / 2**30:.1f} of {gib} GiB" in path.read_text()
    doubled = load_recipe(path, [f"training.batch_size={2 * planned_batch(path)}"])
    assert not plan(doubled, config=config, gpu_memory=f"{gib}GiB").fits or planned_batch(path) == 16


def planned_batch(path: Path) -> int:
    return yaml.safe_load(path.read_text())["training"]["batch_size"]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_new_writes_a_preference_stage_the_planner_sizes_with_both_answers(tmp_path: Path, objective: str):
    pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 120
    labelled = [{"prompt": "2+2?", "completion": "4", "label": True}] * 120
    data = write_jsonl(tmp_path / "pairs.jsonl", labelled if objective == "kto" else pairs)
    path = tmp_path / "dpo.yaml"
    path.write_text(new_recipe("Qwen/Qwen2.5-7B-Instruct", "qlora", str(data), "24GiB", CATALOG, objective))
    recipe = load_recipe(path)
    assert recipe.training.objective == objective and recipe.preference.beta == 0.1
    config = tmp_path / "config.json"
    config.write_text(json.dumps(shipped_config("Qwen/Qwen2.5-7B-Instruct", CATALOG)))
    planned = plan(recipe, config=config, gpu_memory="24GiB")
    assert planned.fits and "reference forward" in planned.parts
    precomputed = plan(
        load_recipe(path, ["preference.precompute_ref_log_probs=true"]), config=config, gpu_memory="24GiB"
    )
    assert "reference forward" not in precomputed.parts and precomputed.total < planned.total
    assert planned.tokens_per_step == 2 * recipe.training.batch_size * recipe.training.max_length
    with pytest.raises(CatalogError, match="reads rows with chosen and rejected"):
        sft_rows = str(write_jsonl(tmp_path / "sft.jsonl", fruit_rows(3)))
        new_recipe("Qwen/Qwen2.5-7B-Instruct", "qlora", sft_rows, "24GiB", CATALOG, "dpo")
