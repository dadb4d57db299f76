"""Task head: a sequence-classification head on the tiny causal LM, trained through the recipe, beats chance on
held-out rows, and reloads with vanilla transformers + peft to the same predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_tune.errors import DataError
from lora_tune.recipe.load import load_recipe
from tests.conftest import write_jsonl
from tests.helpers import labelled_rows, write_case


@pytest.mark.parametrize(
    ("adapter", "lr"),
    [({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 1e-2), ({"method": "full"}, 1e-3)],
    ids=["lora", "full"],
)
def test_classifier_beats_chance_and_reloads(tiny_model_dir: Path, tmp_path: Path, adapter: dict, lr: float):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_tune import train

    result = train(load_recipe(write_case(tmp_path, tiny_model_dir, adapter, lr)))
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_accuracy"] >= 0.8, summary  # chance is 0.5 on the balanced held-out set
    assert 0 < summary["trainable_percent"] <= 100 and summary["method"] == adapter["method"]
    losses = [
        json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert losses[-1] < losses[0]

    # Vanilla reload: the base with a head of len(labels) outputs, then the adapter (which carries the head).
    labels = json.loads((result.adapter_dir / "labels.json").read_text())
    assert labels == ["fruit", "number"]
    if adapter["method"] == "full":
        model = AutoModelForSequenceClassification.from_pretrained(result.adapter_dir, dtype=torch.float32)
        assert model.config.id2label == {0: "fruit", 1: "number"}
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = PeftModel.from_pretrained(base, result.adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.adapter_dir)
    rows = labelled_rows(40, seed=2)
    batch = tokenizer([r["sentence"] for r in rows], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    reloaded_accuracy = sum(labels[p] == r["kind"] for p, r in zip(predicted, rows, strict=True)) / len(rows)
    assert reloaded_accuracy == pytest.approx(summary["eval_accuracy"])


def test_unknown_label_names_file_and_row(tiny_model_dir: Path, tmp_path: Path):
    from lora_tune import train

    path = write_case(tmp_path, tiny_model_dir, {"method": "lora"}, 1e-2)
    rows = labelled_rows(10, seed=3)
    rows[3]["kind"] = "vegetable"
    write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        train(load_recipe(path))
    assert err.value.row == 4 and err.value.field == "kind" and "vegetable" in str(err.value)
