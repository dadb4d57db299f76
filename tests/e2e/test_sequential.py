"""Sequential fine-tuning: continue an earlier run's adapter, or start from its merged model; lineage recorded in
the run directory, the resolved recipe and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_tune.recipe.load import load_recipe
from tests.helpers import logged_losses, probe_logits, reload, train_capturing
from tests.helpers import write_methods_recipe as write_recipe

LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_tune import train

    root = tmp_path_factory.mktemp("first")
    train(load_recipe(write_recipe(root, tiny_model_dir, LORA, 2e-2, None, 10)))
    return root / "run"


def test_continue_adapter(first_run: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from transformers import AutoTokenizer

    adapter = {"method": "lora", "init_from": str(first_run)}
    _, trained = train_capturing(write_recipe(tmp_path, tiny_model_dir, adapter, 2e-2, None, 4), monkeypatch)
    run = tmp_path / "run"

    # It starts where the first run ended, not from a fresh adapter.
    first, second = logged_losses(first_run), logged_losses(run)
    assert second[0] < first[0] - 0.1 and abs(second[0] - first[-1]) < abs(second[0] - first[0])

    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["parents"][0]["kind"] == "adapter"
    assert lineage["parents"][0]["path"] == str(first_run / "adapter")
    assert yaml.safe_load((run / "recipe.yaml").read_text())["adapter"]["init_from"] == str(first_run)

    # The continued adapter is a plain LoRA adapter on the original base and reproduces the trained model.
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    reloaded = probe_logits(reload(run, tiny_model_dir, None), tokenizer)
    assert (reloaded - probe_logits(trained, tokenizer)).abs().max().item() < 1e-4

    from lora_tune.export.card import adapter_card
    from lora_tune.run.layout import RunDir

    card = adapter_card(RunDir(run), load_recipe(run / "recipe.yaml", check_paths=False))
    assert "## Lineage" in card and f"adapter: {first_run / 'adapter'}" in card


def test_continue_refuses_other_method(first_run: Path, tiny_model_dir: Path, tmp_path: Path):
    from lora_tune import train
    from lora_tune.errors import MethodError

    recipe = write_recipe(tmp_path, tiny_model_dir, {"method": "ia3", "init_from": str(first_run)}, 1e-2, None, 2)
    with pytest.raises(MethodError, match="holds a lora adapter"):
        train(load_recipe(recipe))


def test_start_from_merged_model(first_run: Path, tmp_path: Path):
    from lora_tune import train
    from lora_tune.export import merge
    from lora_tune.export.card import adapter_card
    from lora_tune.run.layout import RunDir

    merged = tmp_path / "merged"
    merge(first_run, merged, dtype="fp32")
    assert json.loads((merged / "lineage.json").read_text())["run"] == str(first_run)

    (tmp_path / "second").mkdir()
    train(load_recipe(write_recipe(tmp_path / "second", merged, LORA, 2e-2, None, 2)))
    run = tmp_path / "second" / "run"
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["parents"][0]["kind"] == "merged model" and lineage["parents"][0]["path"] == str(merged)
    card = adapter_card(RunDir(run), load_recipe(run / "recipe.yaml", check_paths=False))
    assert f"merged model: {merged}" in card
