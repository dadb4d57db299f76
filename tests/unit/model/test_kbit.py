"""The k-bit preparation keeps frozen bfloat16 weights in bfloat16, at half the bytes, with the loss of peft's float32
preparation: the GPU path (bfloat16 base, NF4 layers, autocast to bfloat16, TRL's chunked LM head) run on the CPU."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import LlamaConfig, LlamaForCausalLM

from lora_tune.model.kbit import frozen_unquantized_bytes, prepare_for_kbit_training
from lora_tune.model.load import load_model
from lora_tune.recipe.schema import ModelConfig, QuantizationConfig, TrainingConfig

pytest.importorskip("bitsandbytes")

# Measured between the two (bfloat16 residual stream against float32): 6.8e-7 and 5.8e-6 relative (seeds 0, 1).
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    folder = tmp_path_factory.mktemp("bf16-base")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def loaded(base: str, monkeypatch: pytest.MonkeyPatch | None = None) -> torch.nn.Module:
    """The base as `train` loads it (bfloat16, NF4); with `monkeypatch`, prepared by peft instead, for comparison."""
    if monkeypatch is not None:
        monkeypatch.setattr(
            "lora_tune.model.load.prepare_for_kbit_training",
            lambda model, gradient_checkpointing: prepare_model_for_kbit_training(
                model, gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
            ),
        )
    training = TrainingConfig(gradient_checkpointing=True, tiled_mlp=False)
    model = load_model(ModelConfig(name=base, dtype="bfloat16"), QuantizationConfig(bits=4), training)
    if monkeypatch is not None:
        monkeypatch.undo()
    return model


def chunked_loss(model: torch.nn.Module, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One training forward and backward as SFTTrainer runs it on a GPU: LoRA, TRL's fused chunked LM head,
    autocast to bfloat16."""
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs",))
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    peft.train()
    ids = torch.randint(3, 256, (1, 96), generator=torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = peft(input_ids=ids, labels=ids, fused_lm_head=True)
    out.loss.backward()
    return out.loss.item(), {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}


def test_frozen_bfloat16_weights_stay_bfloat16_at_half_peft_s_bytes(base, monkeypatch):
    ours_model, peft_model = loaded(base), loaded(base, monkeypatch)
    ours, peft = frozen_unquantized_bytes(ours_model), frozen_unquantized_bytes(peft_model)
    assert set(ours) == {"bfloat16"} and set(peft) == {"float32"}
    assert ours["bfloat16"] * 2 == peft["float32"]
    # The residual stream (and so every checkpointed layer input) is bfloat16, where peft's makes it float32.
    ids = torch.tensor([[5, 6, 7]])
    assert ours_model.get_input_embeddings()(ids).dtype == torch.bfloat16
    assert peft_model.get_input_embeddings()(ids).dtype == torch.float32


@pytest.mark.parametrize("seed", [0, 1])
def test_the_loss_equals_peft_s_float32_preparation(base, seed, monkeypatch):
    ours, ours_grads = chunked_loss(loaded(base), seed)
    theirs, their_grads = chunked_loss(loaded(base, monkeypatch), seed)
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL)
    assert ours_grads.keys() == their_grads.keys()
    # Gradients agree in direction: cosine similarity of the whole LoRA gradient.
    a = torch.cat([g.flatten().float() for g in ours_grads.values()])
    b = torch.cat([their_grads[k].flatten().float() for k in ours_grads])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() > 0.99


def test_float16_weights_are_still_cast_to_float32():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.float16), torch.nn.LayerNorm(4).to(torch.bfloat16))
    prepare_for_kbit_training(model, gradient_checkpointing=False)
    assert model[0].weight.dtype == torch.float32 and model[1].weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
