"""The merge's verification, one decoder layer at a time: it agrees with peft and the merged model loaded whole, and
it fails, naming the layer, on a wrong merge (a corrupted tensor, swapped LoRA factors, a dropped scale)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lora_tune.export import ExportError, VerificationError, merge
from lora_tune.export.layerwise import layerwise_logits
from lora_tune.export.streaming import read_adapter
from lora_tune.export.verify import verification_inputs
from lora_tune.quickstart.tiny import build_tokenizer
from tests.conftest import CORPUS
from tests.helpers import lora, make_run

WHOLE_MODEL_NOTE = "checking the whole model instead"


def peft_and_merged_logits(run: Path, base_dir: Path, merged: Path, input_ids):  # noqa: ANN001, ANN201
    """Logits of base + adapter through peft and of the merged folder through the Auto classes, both whole."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        reference = PeftModel.from_pretrained(base, run / "adapter").eval()(input_ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        return reference, merged_model(input_ids).logits


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_dora": True},
        {"use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
        {"modules_to_save": ["lm_head"]},
    ],
    ids=["lora", "dora", "rslora+patterns", "modules_to_save"],
)
def test_layerwise_logits_equal_peft_and_the_whole_merged_model(tiny_model_dir: Path, tmp_path: Path, options: dict):
    run = make_run(tmp_path, tiny_model_dir, lora(**options))
    merge(run, tmp_path / "merged", dtype="fp32", verify=False)
    ids = verification_inputs(300)
    outcome = layerwise_logits(tmp_path / "merged", tiny_model_dir, read_adapter(run / "adapter"), ids)
    reference, merged = peft_and_merged_logits(run, tiny_model_dir, tmp_path / "merged", ids)
    assert float((outcome.reference - reference).abs().max()) < 1e-5
    assert float((outcome.merged - merged).abs().max()) < 1e-5
    assert [layer.name for layer in outcome.layers] == ["model.layers.0", "model.layers.1"]


def test_default_merge_verifies_layer_by_layer(tiny_model_dir: Path, tmp_path: Path, caplog):
    run = make_run(tmp_path, tiny_model_dir, lora())
    with caplog.at_level(logging.INFO):
        result = merge(run, tmp_path / "merged", dtype="bf16")
    assert result.max_abs_diff <= result.tolerance
    assert "largest layer difference" in caplog.text and WHOLE_MODEL_NOTE not in caplog.text
    assert "planned peak memory" in caplog.text


def test_corrupted_tensor_of_one_layer_fails_naming_that_layer(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from lora_tune.export import merging

    real = merging.write_shard

    def corrupt(path, specs, tensors):  # noqa: ANN001, ANN202
        def changed():  # noqa: ANN202
            for name, tensor in tensors:
                yield name, tensor * 1.5 if name == "model.layers.1.mlp.down_proj.weight" else tensor

        return real(path, specs, changed())

    monkeypatch.setattr(merging, "write_shard", corrupt)
    run = make_run(tmp_path, tiny_model_dir, lora())
    with pytest.raises(VerificationError, match=r"largest layer difference .* at model\.layers\.1 "):
        merge(run, tmp_path / "merged", dtype="fp32")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["run"]


def test_swapped_lora_factors_of_two_layers_fail_naming_one_of_them(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from lora_tune.export import merging

    def swapped(adapter_dir):  # noqa: ANN001, ANN202 - the merge reads layer 1's factors for layer 0 and back
        plan = read_adapter(adapter_dir)
        for projection in ("self_attn.q_proj", "mlp.up_proj"):
            first = plan.updates[f"model.layers.0.{projection}"]
            second = plan.updates[f"model.layers.1.{projection}"]
            first.A, second.A, first.B, second.B = second.A, first.A, second.B, first.B
        return plan

    monkeypatch.setattr(merging, "read_adapter", swapped)
    run = make_run(tmp_path, tiny_model_dir, lora())
    with pytest.raises(VerificationError, match=r"at model\.layers\.[01] "):
        merge(run, tmp_path / "merged", dtype="fp32")


def test_dropped_lora_scale_fails_naming_a_layer(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from lora_tune.export.streaming import LoraUpdate

    def unscaled(self, fan_in_fan_out):  # noqa: ANN001, ANN202 - B @ A, the scale alpha / r forgotten
        return self.B.float() @ self.A.float()

    monkeypatch.setattr(LoraUpdate, "delta", unscaled)
    run = make_run(tmp_path, tiny_model_dir, lora(), seed=3)
    with pytest.raises(VerificationError, match=r"at model\.layers\.\d+ "):
        merge(run, tmp_path / "merged", dtype="bf16")


def test_adapters_without_a_streaming_merge_fall_back_with_a_note(tiny_model_dir: Path, tmp_path: Path, caplog):
    from peft import IA3Config

    run = make_run(tmp_path, tiny_model_dir, IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with caplog.at_level(logging.INFO):
        result = merge(run, tmp_path / "merged", dtype="fp32")
    assert result.max_abs_diff <= result.tolerance
    assert WHOLE_MODEL_NOTE in caplog.text and "float32 memory" in caplog.text


def test_merge_that_will_not_fit_in_memory_is_refused_with_advice(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from lora_tune.export import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 10 * 2**20)
    run = make_run(tmp_path, tiny_model_dir, lora())
    with pytest.raises(ExportError, match="not enough memory.*free memory"):
        merge(run, tmp_path / "merged", dtype="fp32")
    assert not (tmp_path / "merged").exists()


def test_verification_that_will_not_fit_suggests_no_verify(monkeypatch):
    from lora_tune.export import memory

    monkeypatch.setattr(memory, "available_memory", lambda: 2 * 2**30)
    plan = memory.MemoryPlan(merge=2**30, verify=3 * 2**30, how="whole-model verification")
    with pytest.raises(ExportError, match="--no-verify"):
        memory.check_memory_for_merge(plan)


# model_type -> settings that make a tiny model of each catalog architecture (recipes/configs/*.json)
ARCHITECTURES = {
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 8},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16, "sliding_window_pattern": 2},
    "phi3": {"pad_token_id": 0},
}


def tiny_base(model_type: str, out: Path) -> int:
    """A 2-layer model of the architecture, saved with the project's tiny tokenizer; returns the vocabulary size."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer(CORPUS * 20, vocab_size=320)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=model_type.startswith("gemma"),
        **ARCHITECTURES[model_type],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def assert_layerwise_equals_whole(run: Path, base: Path, merged: Path, vocab: int) -> None:
    ids = verification_inputs(vocab)
    outcome = layerwise_logits(merged, base, read_adapter(run / "adapter"), ids)
    reference, whole = peft_and_merged_logits(run, base, merged, ids)
    assert float((outcome.reference - reference).abs().max()) < 1e-4
    assert float((outcome.merged - whole).abs().max()) < 1e-4


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_catalog_architectures_verify_layer_by_layer(model_type: str, tmp_path: Path, caplog):
    vocab = tiny_base(model_type, tmp_path / "base")
    run = make_run(tmp_path, tmp_path / "base", lora())
    with caplog.at_level(logging.INFO):
        merge(run, tmp_path / "merged", dtype="fp32")
    assert "largest layer difference" in caplog.text and WHOLE_MODEL_NOTE not in caplog.text
    assert_layerwise_equals_whole(run, tmp_path / "base", tmp_path / "merged", vocab)


def test_lora_bias_on_biased_projections_verifies_layer_by_layer(tmp_path: Path, caplog):
    from peft import LoraConfig

    vocab = tiny_base("qwen2", tmp_path / "base")  # q, k and v projections have biases
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    run = make_run(tmp_path, tmp_path / "base", config)
    with caplog.at_level(logging.INFO):
        merge(run, tmp_path / "merged", dtype="fp32")
    assert "largest layer difference" in caplog.text and WHOLE_MODEL_NOTE not in caplog.text
    assert_layerwise_equals_whole(run, tmp_path / "base", tmp_path / "merged", vocab)
