"""Every fine-tuning method end to end on the tiny model on the CPU: the loss falls, the summary reports the
trainable share, and the saved artefact reloads with vanilla peft/transformers and computes what the trained
model computed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lora_tune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "methods" / "tiny"
# Every tiny method recipe (their base and the recipes other tests train are left out).
METHOD_RECIPES = sorted(p.stem for p in TINY.glob("*.yaml") if p.stem not in ("base", "sequential", "classification"))

# P-tuning moves a random-initialised tiny model slowly: with a near-zero learning rate the same 16 batches stay at
# the first steps' loss (measured 5.78 +- 0.04), with the recipe's they fall to 5.67 +- 0.03.
SLOW_LEARNERS = {"p-tuning": 16}

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


def write_recipe(root: Path, model: Path, adapter: dict[str, Any], lr: float, bits: int | None, steps: int) -> Path:
    """A recipe written out in full (the sequential tests use it)."""
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


def tiny_recipe(name: str, model: Path, root: Path, steps: int) -> Any:
    """The shipped tiny recipe, pointed at the test's even tinier model and data, for a few steps."""
    from tests.conftest import fruit_rows, write_jsonl

    data = write_jsonl(root / "train.jsonl", fruit_rows(48, "alpaca"))
    overrides = [
        f"model.name={model}",
        f"datasets.0.path={data}",
        f"output_dir={root / 'run'}",
        f"training.max_steps={steps}",
        "training.logging_steps=1",
        "training.max_length=64",
        "data.dedupe=none",  # the fruit rows repeat on purpose: 48 rows, not 9 distinct ones
    ]
    return load_recipe(TINY / f"{name}.yaml", overrides)


LAST_LEARNING_RATES: list[float] = []  # the optimizer's distinct learning rates in the last captured run


def train_capturing(recipe: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """Train the recipe; return the run result and the in-memory trained model, taken as it is saved."""
    from lora_tune.methods import runtime
    from lora_tune.train import train

    captured: dict[str, Any] = {}
    real_save = runtime.save_artifact

    def spy(recipe, trainer, tokenizer, build, run_root):  # noqa: ANN001
        captured["model"] = trainer.model
        groups = [g for g in trainer.optimizer.param_groups if g["params"]]  # LoRA+ leaves some groups empty
        LAST_LEARNING_RATES[:] = sorted({g.get("initial_lr", g["lr"]) for g in groups})
        real_save(recipe, trainer, tokenizer, build, run_root)

    monkeypatch.setattr(runtime, "save_artifact", spy)
    result = train(recipe if not isinstance(recipe, Path) else load_recipe(recipe))
    return result, captured["model"]


def logged_losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def reload(run: Path, base_dir: Path, bits: int | None) -> Any:
    """The saved artefact through vanilla transformers/peft only."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_tune.packed_4bit import keep_unpacked

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
    # Training computed the 4-bit layers in float32; on an AVX512-BF16 CPU a vanilla load would repack them for
    # bfloat16 inference at the first eval forward (measured 2.9e-3 away), so compare the same function.
    keep_unpacked(base)
    model = PeftModel.from_pretrained(base, run / "adapter")
    if bits is not None:
        # TRL trains a quantized base's adapter in bfloat16 (the QLoRA paper's choice; DoRA magnitudes excepted) and
        # it is saved so; peft loads it into float32 layers. Compute in the dtype that was trained.
        for name, param in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                param.data = param.data.to(torch.bfloat16)
    return model


def probe_logits(model: Any, tokenizer: Any) -> Any:
    import torch

    batch = tokenizer(["fruit number 3?", "name a fruit: apple"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def test_every_method_has_a_tiny_recipe():
    from typing import get_args

    from lora_tune.config import Method

    methods = {load_recipe(TINY / f"{name}.yaml").adapter.method for name in METHOD_RECIPES}
    assert methods == set(get_args(Method))


@pytest.mark.parametrize("name", METHOD_RECIPES)
def test_method_trains_saves_and_reloads(
    name: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from transformers import AutoTokenizer

    steps = SLOW_LEARNERS.get(name, 8)
    recipe = tiny_recipe(name, tiny_model_dir, tmp_path, steps)
    bits = recipe.quantization.bits
    result, trained = train_capturing(recipe, monkeypatch)
    run = tmp_path / "run"

    losses = logged_losses(run)
    assert len(losses) >= steps - 1
    # Batch losses are noisy: compare the mean of the last four steps with the mean of the first four.
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.03, losses

    if recipe.adapter.loraplus_lr_ratio is not None:  # LoRA+: B's learning rate is ratio x A's
        low, high = min(LAST_LEARNING_RATES), max(LAST_LEARNING_RATES)
        assert low == recipe.training.learning_rate and high == pytest.approx(low * recipe.adapter.loraplus_lr_ratio)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == recipe.adapter.method
    from lora_tune.run_dir import foreign_entries

    assert foreign_entries(run) == []  # every method writes only names that --overwrite may remove
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    assert summary["trainable_percent"] == pytest.approx(
        100 * summary["trainable_parameters"] / summary["total_parameters"], abs=1e-3
    )
    if recipe.adapter.method == "full":
        assert summary["trainable_percent"] == 100
    else:
        assert summary["trainable_percent"] < 100
    if recipe.adapter.method in ("full", "partial"):
        from lora_tune.export import ExportError, merge

        assert (run / "model" / "config.json").is_file() and not (run / "adapter").exists()
        with pytest.raises(ExportError, match="no adapter to merge"):
            merge(run, tmp_path / "merged")

    tokenizer = AutoTokenizer.from_pretrained(run / ("model" if (run / "model").is_dir() else "adapter"))
    expected = probe_logits(trained, tokenizer)
    reloaded_model = reload(run, tiny_model_dir, bits)
    reloaded = probe_logits(reloaded_model, tokenizer)
    tolerance = 1e-4
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
