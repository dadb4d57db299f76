"""Every catalog model's architecture trains through `lora-tune train` with its catalog recipe.

For each architecture (model_type) in the catalog, a tiny random model of the same class is built from a shrunken
copy of the config.json the catalog ships (recipes/configs/), with the project's tiny tokenizer; then the catalog
recipe itself is trained for a few steps on it, with overrides only for the model path, the data, the CPU and the
run length. QLoRA recipes train on a 4-bit NF4 base (bitsandbytes runs it on the CPU), LoRA recipes on 16/32-bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.plan.catalog import list_catalog, method_of, shipped_config
from tests.conftest import CORPUS, fruit_rows, write_jsonl
from tests.helpers import catalog_by_architecture, shrink

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "recipes"
FAMILIES = {"llama", "qwen", "mistral", "gemma", "phi", "smollm"}
# Text families only: the vision catalog (recipes/vision/) trains in tests/e2e/test_vision.py (tiny LLaVA, Idefics3).
ARCHITECTURES = {t: e for t, e in catalog_by_architecture().items() if e.recipe.vision is None}


@pytest.fixture(scope="module")
def tokenizer():
    from lora_tune.quickstart.tiny import build_tokenizer

    return build_tokenizer(CORPUS * 20, vocab_size=320)


def build_tiny(model_type: str, config: dict, tokenizer, out: Path) -> tuple[str, int]:  # noqa: ANN001
    """Save the tiny model and tokenizer to `out`; return the model class and its count of linear projections."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shrink(config, tokenizer)))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    return type(model).__name__, len(linears)


def test_the_matrix_covers_every_catalog_model():
    """Each catalog recipe's model ships a config whose architecture the matrix below trains."""
    for entry in list_catalog(CATALOG):
        if entry.name.split("/")[0] not in FAMILIES:
            continue  # the quickstart's base is built locally; other folders hold other kinds of recipes
        config = shipped_config(entry.model, CATALOG)
        assert config is not None, f"{entry.name}: no recipes/configs/{entry.model}.json"
        assert config["model_type"] in ARCHITECTURES
    assert {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3"} <= set(ARCHITECTURES)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_catalog_recipe_trains_on_its_architecture(model_type: str, tokenizer, tmp_path: Path):
    entry = ARCHITECTURES[model_type]
    config = shipped_config(entry.model, CATALOG)
    class_name, linears = build_tiny(model_type, config, tokenizer, tmp_path / "model")
    assert class_name == config["architectures"][0]
    form = entry.recipe.datasets[0].format
    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(24, "alpaca" if form == "alpaca" else "messages"))
    overrides = [
        f"model.name={tmp_path / 'model'}",
        "model.dtype=float32",
        "model.chat_template=null",  # the tiny tokenizer's own template; a built-in's markers are not in its vocab
        f"datasets=[{{path: {data}}}]",
        "val_size=0",
        "training.eval_strategy=no",
        "training.eval_steps=null",
        "training.max_steps=3",
        "training.batch_size=4",
        "training.gradient_accumulation_steps=1",
        "training.max_length=64",
        "training.optimizer=adamw_torch",  # paged 8-bit AdamW is a CUDA optimizer
        "training.save_strategy=no",
        "training.logging_steps=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert main(["train", str(entry.path), *overrides]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3
    # QLoRA: every projection of the base is a bitsandbytes 4-bit layer (Phi-3 fuses qkv and gate/up: 4 a layer).
    assert summary["quantized_layers"] == (linears if method_of(entry.recipe) == "qlora" else 0)
    assert summary["trainable_parameters"] > 0
    losses = [json.loads(line).get("loss") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
