"""LoftQ on the CPU: the factors are the best rank-r correction of the NF4 error (the same decomposition as peft's,
with the LoRA scale divided out), and a LoftQ-initialised 4-bit model computes closer to the unquantized base than
plain QLoRA does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_tune.methods.loftq import init_loftq, loftq_factors
from lora_tune.model.packed_4bit import cpu_packs_4bit
from lora_tune.recipe.schema import ModelConfig


def nf4(weight: torch.Tensor):
    import bitsandbytes as bnb

    return bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4").to("cpu")


def dequantized(param) -> torch.Tensor:
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(param.data, param.quant_state).float()


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_factors_are_the_best_rank_r_correction_of_the_quantization_error(scale):
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.05
    quantized = nf4(weight)
    A, B = loftq_factors(quantized, weight, rank=8, scale=scale)
    assert A.shape == (8, 64) and B.shape == (96, 8)
    residual = weight - dequantized(quantized)
    corrected = residual - scale * B @ A
    singular = torch.linalg.svdvals(residual)
    # Eckart-Young: the rank-8 truncated SVD leaves exactly the energy of the other singular values.
    assert corrected.norm().item() == pytest.approx(singular[8:].square().sum().sqrt().item(), rel=1e-4)
    assert corrected.norm() < 0.95 * residual.norm()
    if scale == 1.0:  # and it is peft's own decomposition (peft leaves the scale out)
        from peft.utils.loftq_utils import _low_rank_decomposition

        peft_out = _low_rank_decomposition(residual, reduced_rank=8)
        assert torch.allclose(peft_out["R"], A, atol=1e-5) and torch.allclose(peft_out["L"], B, atol=1e-5)


@pytest.mark.parametrize(
    "packing",
    [
        False,
        pytest.param(True, marks=pytest.mark.skipif(not cpu_packs_4bit(), reason="this CPU lacks AVX512-BF16")),
    ],
    ids=["unpacked", "packed"],
)
def test_a_loftq_model_starts_closer_to_the_unquantized_base(tiny_model_dir: Path, packing: bool):
    """Also after an eval forward that let bitsandbytes repack the 4-bit weights (AVX512-BF16 CPUs): init_loftq
    restores their layout before fitting, where it once fitted scrambled values (8x worse than plain QLoRA)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_tune.model.packed_4bit import FLAG, four_bit_layers, is_packed

    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=four_bit)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).eval()
    for layer in four_bit_layers(model):
        setattr(layer, FLAG, packing)
    ids = torch.randint(0, full.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = full(input_ids=ids).logits
        qlora_error = (model(input_ids=ids).logits - reference).abs().mean().item()  # B = 0: the 4-bit base
        assert all(is_packed(layer.weight) for layer in four_bit_layers(model)) == packing
        layers = init_loftq(model, ModelConfig(name=str(tiny_model_dir)))
        loftq_error = (model(input_ids=ids).logits - reference).abs().mean().item()
    linear_layers = sum(isinstance(m, torch.nn.Linear) for m in full.model.layers.modules())
    assert layers == linear_layers  # every linear layer of every block (lm_head stays unquantized)
    # The NF4 error of random weights is noise-like, so rank 8 of 64 removes a modest share: measured 18% here.
    assert loftq_error < 0.9 * qlora_error, (loftq_error, qlora_error)


def test_without_a_4bit_layer_it_says_so(tiny_model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_tune.errors import MethodError

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraConfig(r=4))
    with pytest.raises(MethodError, match="adapter.init: loftq found no 4-bit LoRA layer"):
        init_loftq(model, ModelConfig(name=str(tiny_model_dir)))
