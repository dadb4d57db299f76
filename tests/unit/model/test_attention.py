"""SDPA per packed example (sdpa_varlen): exact against each example run alone and against transformers' block mask,
for every model class it is chosen for; unchanged behaviour for padded batches and generation; chosen only where
the attention is plain causal attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lora_tune.model import attention as varlen_attention
from lora_tune.recipe.schema import Recipe

LENGTHS = (7, 12, 5)  # three examples packed into one 24-token row


def tiny(model_type: str, attn: str = "sdpa", **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in the real models
        max_position_embeddings=256,
        pad_token_id=0,
        **overrides,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if attn != "sdpa":
        varlen_attention.register()
        model.set_attn_implementation(attn)
    return model.eval()


def packed_row(lengths=LENGTHS) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds}


@pytest.mark.parametrize("model_type", sorted(varlen_attention.PLAIN_CAUSAL))
def test_a_packed_row_equals_each_example_run_alone(model_type):
    model = tiny(model_type, varlen_attention.NAME)
    row = packed_row()
    with torch.no_grad():
        packed = model(**row).logits[0]
        start = 0
        for n in LENGTHS:
            alone = model(input_ids=row["input_ids"][:, start : start + n]).logits[0]
            assert torch.allclose(packed[start : start + n], alone, atol=1e-5), (model_type, start)
            start += n


@pytest.mark.parametrize("model_type", sorted(varlen_attention.PLAIN_CAUSAL))
@pytest.mark.parametrize("bounds_from", ["cu_seq_lens", "position_ids"])
def test_loss_and_gradients_match_transformers_block_mask(model_type, bounds_from):
    """The same loss and gradients as SDPA with transformers' block-diagonal mask, bounds from either source."""
    row = packed_row()
    if bounds_from == "position_ids":
        row = {k: v for k, v in row.items() if not k.startswith("cu_")}
    results = []
    for attn in ("sdpa", varlen_attention.NAME):
        model = tiny(model_type, attn).train()
        # use_cache=False, as TRL passes it: under a cache transformers skips its packed-row detection
        loss = model(**row, labels=row["input_ids"], use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_mask, grads_mask), (loss_varlen, grads_varlen) = results
    assert torch.allclose(loss_mask, loss_varlen, atol=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(grads_mask, grads_varlen, strict=True)) < 1e-5


def test_padded_batches_and_generation_are_transformers_sdpa():
    sdpa, varlen = tiny("llama"), tiny("llama", varlen_attention.NAME)
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        assert torch.equal(
            sdpa(input_ids=ids, attention_mask=mask).logits, varlen(input_ids=ids, attention_mask=mask).logits
        )
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        out_sdpa = sdpa.generate(input_ids=ids, attention_mask=mask, **kwargs)
        out_varlen = varlen.generate(input_ids=ids, attention_mask=mask, **kwargs)
        assert torch.equal(out_sdpa, out_varlen)
        single = ids[:1]
        assert torch.equal(sdpa.generate(input_ids=single, **kwargs), varlen.generate(input_ids=single, **kwargs))


@pytest.mark.parametrize(
    ("model_type", "overrides", "max_length", "expected"),
    [
        ("llama", {}, 512, None),
        ("qwen2", {"use_sliding_window": False}, 4096, None),
        ("mistral", {"sliding_window": 4096}, 2048, None),
        ("mistral", {"sliding_window": 64}, 512, "sliding-window"),
        ("gemma2", {}, 512, "model type 'gemma2'"),
        ("gemma", {}, 512, "model type 'gemma'"),
    ],
)
def test_chosen_only_for_plain_causal_attention(model_type, overrides, max_length, expected):
    reason = varlen_attention.unsupported_reason(AutoConfig.for_model(model_type, **overrides), max_length)
    assert (reason is None) if expected is None else (expected in reason)


def recipe(attn: str = "auto", max_length: int = 64) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"name": "m", "attn_implementation": attn},
            "datasets": [{"path": "d.jsonl"}],
            "output_dir": "o",
            "training": {"max_length": max_length},
        }
    )


def test_auto_switches_a_packed_run_on_the_cpu_and_says_why(tmp_path: Path):
    model = tiny("llama")
    choice = varlen_attention.use_varlen_attention(model, recipe(), packed=True)
    assert choice.value == model.config._attn_implementation == varlen_attention.NAME
    assert "per packed example" in choice.reason
    # What the run saves stays loadable anywhere: the config does not name lora-tune's attention function.
    model.save_pretrained(tmp_path)
    assert varlen_attention.NAME not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_auto_keeps_sdpa_without_packing_or_for_other_attention():
    model = tiny("llama")
    assert varlen_attention.use_varlen_attention(model, recipe(), packed=False).value == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    windowed = tiny("mistral", sliding_window=16)
    choice = varlen_attention.use_varlen_attention(windowed, recipe(max_length=64), packed=True)
    assert choice.value == "sdpa" and "sliding-window" in choice.reason


def test_asking_for_it_on_a_model_that_cannot_use_it_is_refused():
    with pytest.raises(varlen_attention.LeverError, match="sdpa_varlen cannot run this model"):
        varlen_attention.use_varlen_attention(tiny("mistral", sliding_window=16), recipe("sdpa_varlen"), packed=True)


def test_auto_leaves_a_gpu_run_to_transformers():
    """Per-example SDPA is measured on the CPU only: a model on a GPU keeps SDPA (or flash-attention)."""
    from types import SimpleNamespace

    on_gpu = SimpleNamespace(config=tiny("llama").config, device=torch.device("cuda"))
    choice = varlen_attention.use_varlen_attention(on_gpu, recipe(), packed=True)
    assert choice.value == "sdpa" and "flash-attn" in choice.reason
