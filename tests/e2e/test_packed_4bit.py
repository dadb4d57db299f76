"""bitsandbytes' packed 4-bit CPU layout (AVX512-BF16): training loads never pack, inference loads may and say so,
and nothing reads a packed weight's values as NF4.

The packed path needs a CPU with AVX512-BF16 (bitsandbytes has no kernel for it elsewhere): those tests skip with
that reason on other CPUs; the unpacked path runs everywhere, with bitsandbytes' per-layer switch forced on or off.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lora_tune.model.packed_4bit import (
    FLAG,
    PackedWeightError,
    cpu_packs_4bit,
    dequantize,
    four_bit_layers,
    is_packed,
    keep_unpacked,
)
from lora_tune.recipe.schema import ModelConfig, QuantizationConfig, TrainingConfig

needs_packing_cpu = pytest.mark.skipif(
    not cpu_packs_4bit(), reason="this CPU lacks AVX512-BF16: bitsandbytes has no packed 4-bit path here"
)


def load(tiny_model_dir: Path, *, inference: bool, double_quant: bool = True):
    from lora_tune.model.load import load_model

    model = load_model(
        ModelConfig(name=str(tiny_model_dir), dtype="float32"),
        QuantizationConfig(bits=4, double_quant=double_quant),
        TrainingConfig(gradient_checkpointing=False),
        inference=inference,
    )
    return model.eval()


def eval_forward(model) -> torch.Tensor:
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def values(model) -> list[torch.Tensor]:
    return [dequantize(layer.weight).float().clone() for layer in four_bit_layers(model)]


def test_a_training_load_keeps_every_4bit_weight_unpacked_through_an_eval_forward(tiny_model_dir: Path):
    model = load(tiny_model_dir, inference=False)
    layers = four_bit_layers(model)
    assert layers and all(getattr(layer, FLAG) is False for layer in layers)
    before = values(model)
    eval_forward(model)
    assert not any(is_packed(layer.weight) for layer in layers)
    assert all(
        torch.equal(a, b) for a, b in zip(before, values(model), strict=True)
    )  # bit-exact: nothing was rewritten


def test_without_avx512bf16_an_inference_load_stays_unpacked_and_says_nothing(
    tiny_model_dir: Path, monkeypatch, caplog
):
    monkeypatch.setattr("lora_tune.model.packed_4bit.cpu_packs_4bit", lambda: False)
    with caplog.at_level(logging.INFO, logger="lora_tune"):
        model = load(tiny_model_dir, inference=True)
    eval_forward(model)
    assert not any(is_packed(layer.weight) for layer in four_bit_layers(model))
    assert "bfloat16" not in caplog.text


@needs_packing_cpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_an_inference_load_packs_says_so_and_its_values_are_refused_not_scrambled(
    tiny_model_dir: Path, caplog, double_quant: bool
):
    with caplog.at_level(logging.INFO, logger="lora_tune"):
        model = load(tiny_model_dir, inference=True, double_quant=double_quant)
    assert "computes the 14 4-bit layers in bfloat16" in caplog.text
    before = values(model)
    eval_forward(model)
    layers = four_bit_layers(model)
    assert all(is_packed(layer.weight) for layer in layers)
    with pytest.raises(PackedWeightError, match="repacked by bitsandbytes"):
        dequantize(layers[0].weight)
    assert keep_unpacked(model) == len(layers)
    # Restored to the standard layout; only the absmax keeps its bfloat16 rounding (and its re-quantization when
    # nested): measured 0.5% relative at most per value, against 91% from bitsandbytes' own inverse without nesting.
    for a, b in zip(before, values(model), strict=True):
        assert ((a - b).abs() <= 1e-2 * a.abs()).all()
    eval_forward(model)  # and it stays unpacked
    assert not any(is_packed(layer.weight) for layer in layers)


@needs_packing_cpu
def test_the_packed_path_computes_in_bfloat16_and_the_unpacked_in_float32(tiny_model_dir: Path):
    """Why a training load forbids packing: the packed layers compute another function (and have no autograd)."""
    fp32 = eval_forward(load(tiny_model_dir, inference=False))
    packed_model = load(tiny_model_dir, inference=True)
    packed = eval_forward(packed_model)
    assert all(is_packed(layer.weight) for layer in four_bit_layers(packed_model))
    unpacked_again = eval_forward(load(tiny_model_dir, inference=False))
    assert torch.equal(fp32, unpacked_again)
    # Measured 4e-3 here: bfloat16 activations; a float32 path would agree to about 1e-6.
    assert (packed - fp32).abs().max() > 1e-4
