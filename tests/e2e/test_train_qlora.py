"""The real path on a tiny model: 4-bit QLoRA training on the CPU through the CLI, then vanilla peft loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lora_tune.cli import main
from tests.helpers import QLORA_RECIPE as RECIPE


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import fruit_rows, write_jsonl

    root = tmp_path_factory.mktemp("qlora-run")
    data = write_jsonl(root / "train.jsonl", fruit_rows(60, "alpaca"))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, data=data, out=root / "run"))
    assert main(["train", str(recipe)]) == 0
    return root / "run"


def test_run_directory_layout(trained_run: Path):
    adapter = trained_run / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer_config.json").is_file()
    assert (trained_run / "loss.png").stat().st_size > 0
    resolved = yaml.safe_load((trained_run / "recipe.yaml").read_text())
    assert resolved["training"]["max_steps"] == 30 and resolved["quantization"]["bits"] == 4
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens_seen"] > 0 and summary["eval_loss"] is not None
    from lora_tune.run.layout import MARKER, foreign_entries

    assert (trained_run / MARKER).is_file() and foreign_entries(trained_run) == []
    # 2 layers x 7 linear projections, all bitsandbytes 4-bit: the base really was QLoRA's NF4 base.
    assert summary["quantized_layers"] == 14
    # LoRA r=8 on all 7 linears of 2 layers: r * (in + out) each = 2 * 8 * (4 * 128 + 3 * 320) = 23,552.
    assert summary["trainable_parameters"] == 23_552
    assert list((trained_run / "checkpoints").glob("checkpoint-*")), "trainer checkpoints are kept in the run"


def test_loss_fell(trained_run: Path):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 3
    # Nats. A random-init base moves slowly (frozen lm_head) and settles on a plateau near 5.41 from 5.81: the drop
    # measured 0.398 / 0.403 / 0.397 with ATEN_CPU_CAPABILITY=default / avx2 / native (AVX512-BF16 host), so 0.3
    # keeps a 0.097 margin on every kernel path (0.4 sat on the plateau and failed on two of them).
    assert losses[-1] < losses[0] - 0.3, losses
    assert any("eval_loss" in r for r in records)


def test_model_was_4bit_and_adapter_loads_with_vanilla_peft(trained_run: Path, tiny_model_dir: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = tokenizer("fruit number 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, trained_run / "adapter")
        after = tuned(ids).logits
    assert (after - before).abs().max() > 1e-3, "the trained adapter must change the model's output"


def test_second_run_into_same_dir_needs_overwrite(trained_run: Path, capsys):
    recipe = trained_run / "recipe.yaml"
    assert main(["train", str(recipe), "training.max_steps=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_messages_form_recipe_trains_and_loads(tiny_model_dir: Path, tmp_path: Path, messages_file: Path):
    from peft import PeftConfig

    recipe = tmp_path / "messages.yaml"
    text = RECIPE.format(model=tiny_model_dir, data=messages_file, out=tmp_path / "run")
    recipe.write_text(text.replace("val_size: 0.1\n", ""))
    overrides = [
        "training.max_steps=3",
        "training.eval_strategy=no",
        "training.eval_steps=null",
        "adapter.use_dora=true",
    ]
    assert main(["train", str(recipe), *overrides]) == 0
    config = PeftConfig.from_pretrained(tmp_path / "run" / "adapter")
    assert config.use_dora is True and config.r == 8


def test_packed_cpu_run_uses_per_example_sdpa_and_trains_as_the_block_mask(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """`auto` attention on a packed CPU run is sdpa_varlen; it trains what SDPA with the block mask trains."""
    import logging

    from safetensors.torch import load_file

    from lora_tune import train
    from lora_tune.recipe.load import load_recipe
    from tests.conftest import fruit_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(40, "alpaca"))
    runs = {}
    for attention in ("auto", "sdpa"):
        recipe = tmp_path / f"{attention}.yaml"
        text = RECIPE.format(model=tiny_model_dir, data=data, out=tmp_path / attention)
        text = text.replace("  packing: false", "  packing: true").replace("val_size: 0.1", "val_size: 0")
        recipe.write_text(text.replace("  dtype: float32", f"  dtype: float32\n  attn_implementation: {attention}"))
        overrides = ["training.max_steps=6", "training.logging_steps=1", "training.save_strategy=no"]
        overrides += ["training.eval_strategy=no", "training.eval_steps=null", "data.dedupe=none"]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lora_tune"):
            train(load_recipe(recipe, overrides))
        speed_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("speed:"))
        assert speed_line.startswith(f"speed: attention {'sdpa_varlen' if attention == 'auto' else 'sdpa'} ")
        assert any("packed rows (several examples each) per optimizer step" in r.getMessage() for r in caplog.records)
        runs[attention] = tmp_path / attention

    def losses(run: Path) -> list[float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    assert len(losses(runs["auto"])) == 6
    assert json.loads((runs["auto"] / "summary.json").read_text())["packed"] is True
    assert losses(runs["auto"]) == pytest.approx(losses(runs["sdpa"]), abs=1e-4)
    varlen, masked = (load_file(runs[a] / "adapter" / "adapter_model.safetensors") for a in ("auto", "sdpa"))
    assert max((varlen[k].float() - masked[k].float()).abs().max().item() for k in varlen) < 1e-3
    # ...and the adapters did train: far from their start (B = 0).
    assert max(t.float().abs().max().item() for k, t in varlen.items() if "lora_B" in k) > 1e-2
