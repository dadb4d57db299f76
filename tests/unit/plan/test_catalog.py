"""The recipe catalog: listing, lookup, derived facts, shipped model configs, and no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.plan.catalog import (
    CatalogError,
    find_entry,
    format_entry,
    format_table,
    list_catalog,
    method_of,
    planned_peak_memory,
    recipe_files,
    shipped_config,
)
from lora_tune.plan.new import params_from_name
from lora_tune.plan.shape import shape_from_config
from lora_tune.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[3]
CATALOG = ROOT / "recipes"
FAMILIES = {"llama", "qwen", "mistral", "gemma", "phi", "smollm"}


@pytest.fixture(scope="module")
def entries():
    return list_catalog(CATALOG)


def in_families(entries):
    """The model-family folders this catalog's conventions apply to (other folders may hold other recipes)."""
    return [e for e in entries if e.name.split("/")[0] in FAMILIES]


def test_catalog_is_organised_by_family_and_every_entry_is_described(entries):
    families = {e.name.split("/")[0] for e in entries if "/" in e.name}
    assert families >= FAMILIES
    for entry in in_families(entries):
        assert entry.description, f"{entry.path}: the first comment line is the catalog's description"
        assert entry.recipe.output_dir == f"runs/{entry.path.stem}", entry.name


def test_method_comes_from_the_recipe(entries):
    by_name = {e.name: e for e in entries}
    assert by_name["llama/llama-3.1-8b-instruct-qlora-chat"].method == "qlora"
    assert by_name["qwen/qwen2.5-0.5b-instruct-lora-alpaca"].method == "lora"
    for entry in in_families(entries):  # the file name states the method; the recipe decides it
        assert f"-{entry.method}-" in entry.path.stem, entry.name


def test_method_of_other_bases(tmp_path: Path, alpaca_file: Path):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"model: {{name: m}}\nquantization: {{bits: 8}}\ndatasets: [{{path: {alpaca_file}}}]\noutput_dir: runs/x\n"
    )
    assert method_of(load_recipe(path)) == "lora (8-bit base)"


def test_parts_and_launcher_configs_are_not_listed(tmp_path: Path):
    (tmp_path / "base").mkdir()
    (tmp_path / "accelerate").mkdir()
    (tmp_path / "fam").mkdir()
    (tmp_path / "base" / "b.yaml").write_text("training: {learning_rate: 1.0e-4}\n")
    (tmp_path / "accelerate" / "multi.yaml").write_text("num_processes: 2\n")
    (tmp_path / "fam" / "r.yaml").write_text(
        "# A test recipe.\nextends: ../base/b.yaml\nmodel: {name: m}\ndatasets: [{path: x/y}]\noutput_dir: runs/r\n"
    )
    assert [p.relative_to(tmp_path).as_posix() for p in recipe_files(tmp_path)] == ["fam/r.yaml"]
    (entry,) = list_catalog(tmp_path)
    assert (entry.name, entry.description, entry.recipe.training.learning_rate) == ("fam/r", "A test recipe.", 1e-4)


def test_find_by_name_or_stem_and_unknown_names(entries):
    assert find_entry(CATALOG, "qwen/qwen3-8b-qlora-chat").model == "Qwen/Qwen3-8B"
    assert find_entry(CATALOG, "qwen3-8b-qlora-chat.yaml").model == "Qwen/Qwen3-8B"
    with pytest.raises(CatalogError, match="did you mean qwen3-8b-qlora-chat"):
        find_entry(CATALOG, "qwen3-8b")


def test_planned_peak_memory_comes_from_the_planner_for_every_catalog_recipe(entries):
    from lora_tune.plan.memory import GIB, plan

    for entry in in_families(entries):  # each model has its config.json under recipes/configs
        shown = planned_peak_memory(entry.recipe)
        assert shown == f"{plan(entry.recipe, gpu_memory='24GiB').total / GIB:.1f} GiB", entry.name
        assert shown in format_table([entry])


def test_planned_peak_memory_is_unknown_without_a_config_offline(entries, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = entries[0].recipe.model_copy(
        update={"model": entries[0].recipe.model.model_copy(update={"name": "no/such"})}
    )
    assert planned_peak_memory(recipe) is None
    assert "  -  " in format_table([type(entries[0])(**{**entries[0].__dict__, "recipe": recipe})])


def test_table_and_entry_text(entries):
    table = format_table(entries).splitlines()
    assert table[0].split()[:4] == ["recipe", "base", "model", "method"]
    assert len(table) == len(entries) + 2
    assert any("meta-llama/Llama-3.1-8B-Instruct" in row and "qlora" in row for row in table)
    entry = find_entry(CATALOG, "mistral-7b-instruct-v0.3-qlora-chat")
    text = format_entry(entry)
    assert "base model:  mistralai/Mistral-7B-Instruct-v0.3" in text
    assert "alignment-handbook" in text  # the recipe file with its sources follows the facts


def test_cli_lists_and_shows(capsys):
    assert main(["recipes", "--dir", str(CATALOG)]) == 0
    out = capsys.readouterr().out
    assert "qwen/qwen3-4b-qlora-chat" in out and "HuggingFaceTB/SmolLM2-360M-Instruct" in out
    assert main(["recipes", "phi-4-mini-instruct-qlora-chat", "--dir", str(CATALOG)]) == 0
    assert "microsoft/Phi-4-mini-instruct" in capsys.readouterr().out
    assert main(["recipes", "nope", "--dir", str(CATALOG)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no recipe 'nope'")


def test_recipes_and_new_do_not_import_torch(tmp_path: Path, alpaca_file: Path):
    code = (
        "import sys\nfrom lora_tune.cli import main\n"
        f"assert main(['recipes', '--dir', {str(CATALOG)!r}]) == 0\n"
        f"assert main(['recipes', 'llama-3.1-8b-instruct-qlora-chat', '--dir', {str(CATALOG)!r}]) == 0\n"
        f"assert main(['new', '--model', 'Qwen/Qwen3-4B', '--method', 'qlora', '--data', {str(alpaca_file)!r},"
        f" '--dir', {str(CATALOG)!r}]) == 0\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


HUB_MODELS = in_families(list_catalog(CATALOG))


@pytest.mark.parametrize("entry", HUB_MODELS, ids=lambda e: e.name)
def test_every_catalog_model_ships_its_architecture(entry):
    config = shipped_config(entry.model, CATALOG)
    assert config is not None, f"ship recipes/configs/{entry.model}.json"
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert key in config, f"{entry.model}: {key}"
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0
    if "head_dim" not in config:
        assert config["hidden_size"] % config["num_attention_heads"] == 0
    stated = params_from_name(entry.model)
    if stated:  # the size in the name is the publisher's rounding of the real count (Gemma 2 2B has 2.6B)
        assert 0.75 < shape_from_config(config).parameter_count() / stated < 1.35, entry.model


@pytest.mark.parametrize(
    ("model", "billions"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62),
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.494),
        ("Qwen/Qwen3-8B", 8.19),
        ("mistralai/Mistral-7B-Instruct-v0.3", 7.25),
        ("google/gemma-2-2b-it", 2.61),
        ("microsoft/Phi-3-mini-4k-instruct", 3.82),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", 0.362),
    ],
)
def test_shipped_configs_give_the_published_parameter_counts(model: str, billions: float):
    """Counts from the shipped config.json match the model cards' (within 1%): the numbers are the real ones."""
    params = shape_from_config(shipped_config(model, CATALOG)).parameter_count()
    assert params / 1e9 == pytest.approx(billions, rel=0.01)
