"""Every fine-tuning method end to end on the tiny model on the CPU: the loss falls, the summary reports the
trainable share, and the saved artefact reloads with vanilla peft/transformers and computes what the trained
model computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_tune.recipe import load_recipe

RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: {bits}
adapter: {adapter}
datasets:
  - path: {data}
training:
  learning_rate: {lr}
  max_steps: {steps}
  batch_size: 8
  max_length: 64
  warmup_steps: 0
  lr_scheduler: constant
  logging_steps: 1
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""

# method block, learning rate, 4/8-bit or null; a few steps each (seconds on 2 CPU cores).
METHODS: dict[str, tuple[dict[str, Any], float, int | None]] = {
    "lora": ({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-2, None),
    "lora-8bit": ({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-2, 8),
    "dora": ({"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "use_dora": True}, 2e-2, None),
    "rslora-loraplus": (
        {"method": "lora", "r": 8, "alpha": 8, "dropout": 0.0, "use_rslora": True, "loraplus_lr_ratio": 16},
        5e-3,
        None,
    ),
    "lora-gaussian-patterns-regex": (
        {
            "method": "lora",
            "r": 8,
            "alpha": 16,
            "dropout": 0.0,
            "init": "gaussian",
            "target_modules": r".*\.(q_proj|v_proj|down_proj)",
            "rank_pattern": {"down_proj": 4},
            "alpha_pattern": {"down_proj": 8},
        },
        2e-2,
        None,
    ),
    "pissa": ({"method": "lora", "r": 8, "alpha": 8, "dropout": 0.0, "init": "pissa"}, 5e-3, None),
    "olora": ({"method": "lora", "r": 8, "alpha": 8, "dropout": 0.0, "init": "olora"}, 5e-3, None),
    "ia3": (
        {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        5e-2,
        None,
    ),  # fmt: skip
    "ia3-4bit": ({"method": "ia3"}, 5e-2, 4),
    "adalora": (
        {"method": "adalora", "r": 8, "target_r": 4, "alpha": 16, "dropout": 0.0, "tinit": 2, "tfinal": 2},
        2e-2,
        None,
    ),  # fmt: skip
    "loha": ({"method": "loha", "r": 4, "alpha": 8}, 2e-2, None),
    "lokr": ({"method": "lokr", "r": 4, "alpha": 8}, 2e-2, None),
    "prompt_tuning": (
        {"method": "prompt_tuning", "num_virtual_tokens": 8, "prompt_init_text": "name the fruit"},
        1e-1,
        None,
    ),  # fmt: skip
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 8}, 5e-2, None),
    "p_tuning": ({"method": "p_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 32}, 2e-2, None),
    "partial": ({"method": "partial", "last_n_layers": 1, "modules": ["norm"]}, 5e-3, None),
    "full": ({"method": "full"}, 2e-3, None),
}


def write_recipe(root: Path, model: Path, adapter: dict[str, Any], lr: float, bits: int | None, steps: int) -> Path:
    from tests.conftest import fruit_rows, write_jsonl

    data = write_jsonl(root / "train.jsonl", fruit_rows(48, "alpaca"))
    text = RECIPE.format(
        model=model,
        bits="null" if bits is None else bits,
        adapter=json.dumps(adapter),
        data=data,
        lr=lr,
        steps=steps,
        out=root / "run",
    )
    path = root / "recipe.yaml"
    path.write_text(text)
    return path


def train_capturing(recipe_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Train the recipe; return the run result and the in-memory trained model, taken as it is saved."""
    from lora_tune.methods import runtime
    from lora_tune.train import train

    captured: dict[str, Any] = {}
    real_save = runtime.save_artifact

    def spy(recipe, trainer, tokenizer, build, run_root):  # noqa: ANN001
        captured["model"] = trainer.model
        real_save(recipe, trainer, tokenizer, build, run_root)

    monkeypatch.setattr(runtime, "save_artifact", spy)
    result = train(load_recipe(recipe_path))
    return result, captured["model"]


def logged_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def reload(run: Path, base_dir: Path, bits: int | None) -> Any:
    """The saved artefact through vanilla transformers/peft only."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if (run / "model").is_dir():
        return AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32)
    from peft import PeftModel

    four_bit = BitsAndBytesConfig(  # the recipe's defaults: NF4, double quantization, model-dtype compute
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    quant = {4: four_bit, 8: BitsAndBytesConfig(load_in_8bit=True)}.get(bits)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=quant)
    return PeftModel.from_pretrained(base, run / "adapter")


def probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    batch = tokenizer(["fruit number 3?", "name a fruit: apple"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_saves_and_reloads(
    name: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from transformers import AutoTokenizer

    adapter, lr, bits = METHODS[name]
    steps = 8
    result, trained = train_capturing(write_recipe(tmp_path, tiny_model_dir, adapter, lr, bits, steps), monkeypatch)
    run = tmp_path / "run"

    losses = logged_losses(run)
    assert len(losses) >= steps - 1
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses

    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == adapter["method"]
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    assert summary["trainable_percent"] == pytest.approx(
        100 * summary["trainable_parameters"] / summary["total_parameters"], abs=1e-3
    )
    if adapter["method"] == "full":
        assert summary["trainable_percent"] == 100
    else:
        assert summary["trainable_percent"] < 100

    tokenizer = AutoTokenizer.from_pretrained(run / ("model" if (run / "model").is_dir() else "adapter"))
    expected = probe_logits(trained, tokenizer)
    reloaded_model = reload(run, tiny_model_dir, bits)
    reloaded = probe_logits(reloaded_model, tokenizer)
    # bitsandbytes' CPU kernels are not bit-exact between a trained and a freshly quantized copy; float32 is.
    tolerance = 5e-3 if bits else 1e-4
    assert (reloaded - expected).abs().max().item() < tolerance
    # ...and the test can fail: training moved the output far beyond that tolerance.
    base = probe_logits(base_of(reloaded_model, tiny_model_dir), tokenizer)
    text_positions = base.shape[1]  # prompt tuning and p-tuning also return logits for their virtual tokens
    assert (base - expected[:, -text_positions:]).abs().max() > 10 * tolerance


def base_of(model: Any, base_dir: Path) -> Any:
    """The untrained base, as the reloaded artefact sees it (the adapter switched off, or the base folder)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not hasattr(model, "disable_adapter"):
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    class AdapterOff(torch.nn.Module):
        def forward(self, **batch: Any) -> Any:
            with model.disable_adapter():
                return model(**batch)

    return AdapterOff()
