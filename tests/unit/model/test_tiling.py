"""Tiled MLP: the tiled layer computes the untiled layer's loss and gradients, and keeps less for its backward.

Tolerance: loss equal to 1e-6 relative and every trainable gradient to 1e-5 of its largest entry (float32; the
tiles' matmuls have other shapes, so their sums may round differently: 6e-7 was the largest difference measured).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lora_tune.model.tiling import (
    AUTO_MIN_TOKENS,
    TOKENWISE_MLP,
    apply_tiled_mlp,
    mlp_modules,
    remove_tiled_mlp,
    resolve_tiled_mlp,
    tiled_forward,
)
from lora_tune.recipe.schema import TrainingConfig

LOSS_RTOL, GRAD_RTOL = 1e-6, 1e-5
TILE = 16  # tokens per tile in these tests; the rows below hold 2 x 50 = 100 tokens, so 7 tiles, the last short

SMALL = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 96,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL)
    if model_type == "gemma2" or model_type == "gemma3_text":
        config.sliding_window = 256
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def lora_step(model: torch.nn.Module, ids: torch.Tensor, *, checkpointing: bool) -> tuple[float, dict]:
    if checkpointing:
        model.activation_checkpointing_enable()
    peft = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    )
    peft.train()
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad}


def assert_same(untiled: tuple[float, dict], tiled: tuple[float, dict]) -> None:
    assert tiled[0] == pytest.approx(untiled[0], rel=LOSS_RTOL)
    assert untiled[1].keys() == tiled[1].keys() and len(untiled[1]) > 0
    for name, grad in untiled[1].items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        assert (tiled[1][name] - grad).abs().max().item() <= GRAD_RTOL * scale, name


def ids_for(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 50), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("checkpointing", [True, False], ids=["layer-checkpointing", "no-checkpointing"])
def test_tiled_llama_with_lora_gives_the_untiled_loss_and_gradients(checkpointing):
    ids = ids_for(SMALL["vocab_size"])
    untiled = lora_step(tiny("llama"), ids, checkpointing=checkpointing)
    model = tiny("llama")
    assert apply_tiled_mlp(model, TILE) == 2
    assert_same(untiled, lora_step(model, ids, checkpointing=checkpointing))


@pytest.mark.parametrize("model_type", sorted(TOKENWISE_MLP - {"llama"}))
def test_every_tiled_family_gives_the_untiled_loss_and_gradients(model_type):
    ids = ids_for(SMALL["vocab_size"])
    untiled = lora_step(tiny(model_type), ids, checkpointing=True)
    model = tiny(model_type)
    assert apply_tiled_mlp(model, TILE) == 2
    assert_same(untiled, lora_step(model, ids, checkpointing=True))


def test_tiling_a_tampered_mlp_is_caught():
    """The comparison can fail: an MLP whose tiles see each other (not token-wise) no longer matches."""
    ids = ids_for(SMALL["vocab_size"])
    untiled = lora_step(tiny("llama"), ids, checkpointing=False)
    model = tiny("llama")
    apply_tiled_mlp(model, TILE)
    for mlp in mlp_modules(model):
        tiled = mlp.forward
        mlp.forward = lambda x, _f=tiled: _f(x) + x.mean(dim=-2, keepdim=True) * 0.1  # mixes tokens
    with pytest.raises(AssertionError):
        assert_same(untiled, lora_step(model, ids, checkpointing=False))


def test_tiled_4bit_qlora_mlp_gives_the_untiled_loss_and_gradients():
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        tiny("llama").save_pretrained(folder)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

        def load() -> torch.nn.Module:
            torch.manual_seed(0)  # the same LoRA initialisation for both
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu")
            for module in model.modules():  # the training layout (lora_tune.model.packed_4bit)
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
            return model

        ids = ids_for(SMALL["vocab_size"])
        untiled = lora_step(load(), ids, checkpointing=True)
        model = load()
        assert type(model.model.layers[0].mlp.gate_proj).__name__ == "Linear4bit"
        apply_tiled_mlp(model, TILE)
        assert_same(untiled, lora_step(model, ids, checkpointing=True))


def test_without_gradients_the_tiled_forward_is_the_original_call():
    calls = []

    def forward(x):
        calls.append(x.shape)
        return x * 2

    x = torch.randn(2, 50, 8)
    with torch.no_grad():
        assert torch.equal(tiled_forward(forward, x, TILE), x * 2)
    assert calls == [(2, 50, 8)]
    calls.clear()
    tiled_forward(forward, x.requires_grad_(), TILE)
    assert calls == [(16, 8)] * 6 + [(4, 8)]


def test_tiling_keeps_less_for_backward():
    """Bytes autograd keeps after the MLP's forward (no layer checkpointing): the untiled MLP keeps its intermediates
    (gate, act(gate), up, down's input: 4 x 160 per token); the tiled one only the tiles' inputs (views of x)."""
    mlp = tiny("llama").model.layers[0].mlp
    x = torch.randn(1, 512, 64, requires_grad=True)

    def kept(module: torch.nn.Module) -> int:
        sizes: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(sizes.values())

    untiled = kept(mlp)
    holder = tiny("llama")
    apply_tiled_mlp(holder, 64)
    tiled = kept(holder.model.layers[0].mlp)
    assert untiled >= 4 * 512 * 160 * 4
    assert tiled < untiled / 4
    remove_tiled_mlp(holder)
    assert kept(holder.model.layers[0].mlp) >= 4 * 512 * 160 * 4


def test_apply_is_idempotent_and_removable():
    model = tiny("llama")
    apply_tiled_mlp(model, TILE)
    apply_tiled_mlp(model, 32)
    mlp = model.model.layers[0].mlp
    assert mlp.tile_tokens == 32
    remove_tiled_mlp(model)
    assert "forward" not in vars(mlp) or vars(mlp)["forward"].__name__ != "forward_in_tiles"


@pytest.mark.parametrize(
    ("setting", "batch", "length", "model_type", "liger", "expected"),
    [
        ("auto", 1, AUTO_MIN_TOKENS, "llama", False, "on"),
        ("auto", 2, AUTO_MIN_TOKENS // 4, "llama", False, "off"),
        ("auto", 4, AUTO_MIN_TOKENS // 4, "qwen3", False, "off"),  # a batch of short rows: cut the batch instead
        ("auto", 1, None, "qwen3", False, "on"),
        ("auto", 1, 100_000, "gpt2", False, "off"),
        ("auto", 1, 100_000, "llama", True, "off"),
        (True, 1, 512, "llama", False, "on"),
        (True, 1, 512, "falcon", False, "off"),
        (False, 1, 100_000, "llama", False, "off"),
    ],
)
def test_resolve(setting, batch, length, model_type, liger, expected):
    training = TrainingConfig(tiled_mlp=setting, batch_size=batch, max_length=length, liger=liger)
    choice = resolve_tiled_mlp(training, model_type)
    assert choice.value == expected, choice.reason
    assert choice.reason
