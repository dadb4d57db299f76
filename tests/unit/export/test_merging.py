"""Streaming merge on hand-made run directories: adapters built with peft, lora_B randomised so updates count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_tune.cli import main
from lora_tune.export import ExportError, merge
from tests.helpers import MERGE_RECIPE as RECIPE
from tests.helpers import lora, make_run


def save_base(tokenizer_dir: Path, out: Path, *, tied: bool = False, max_shard_size: str | None = None) -> Path:
    """The tiny Llama of `tiny_model_dir`, optionally with tied embeddings or saved in several shards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32)
    if tied:
        config = model.config
        config.tie_word_embeddings = True
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def logit_diff(merged: Path, run: Path, base_dir: Path) -> float:
    """Max |logit difference| of the merged folder (Auto classes) vs base + adapter (peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), run / "adapter"
        )(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
    assert (reference - base_logits).abs().max() > 1e-2, "the test adapter must change the model's output"
    return float((merged_logits - reference).abs().max())


def names(folder: Path) -> list[str]:
    """What a merge left in `folder`, but the empty lock file it keeps beside each destination (locks.release)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".merge.lock"))


@pytest.fixture(scope="module")
def sharded_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_base(tiny_model_dir, tmp_path_factory.mktemp("sharded-base"), max_shard_size="200KB")


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
def test_merged_logits_equal_base_plus_adapter(tiny_model_dir: Path, tmp_path: Path, options: dict):
    run = make_run(tmp_path, tiny_model_dir, lora(**options))
    result = merge(run, tmp_path / "merged", dtype="fp32", verify=False)  # checked independently below
    assert result.method == "streaming"
    assert logit_diff(tmp_path / "merged", run, tiny_model_dir) < 1e-4
    assert result.lora_modules == 14  # 7 linears x 2 layers
    assert result.replaced_tensors == (1 if "modules_to_save" in options else 0)


def test_sharded_base_merges_shard_by_shard_and_keeps_the_index(sharded_base: Path, tmp_path: Path, monkeypatch):
    import lora_tune.export.merging as merge_module

    run = make_run(tmp_path, sharded_base, lora())
    written: list[tuple[str, int]] = []
    real_write = merge_module.write_shard

    def spy(path: Path, specs: dict, tensors) -> int:  # noqa: ANN001 - an iterator of (name, tensor)
        written.append((path.name, len(specs)))
        return real_write(path, specs, tensors)

    monkeypatch.setattr(merge_module, "write_shard", spy)
    result = merge(run, tmp_path / "merged", dtype="bf16")
    base_index = json.loads((sharded_base / "model.safetensors.index.json").read_text())
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert result.shards == len(set(base_index["weight_map"].values())) >= 3
    assert index["weight_map"] == base_index["weight_map"], "same tensors in the same shards"
    assert [name for name, _ in written] == sorted(set(base_index["weight_map"].values()))
    assert sum(n for _, n in written) == len(base_index["weight_map"])
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert result.max_abs_diff <= result.tolerance, "verified against base + adapter"


def test_merged_folder_loads_with_auto_classes_and_keeps_the_chat_template(tiny_model_dir: Path, tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(tmp_path, tiny_model_dir, lora())
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--dtype", "fp16"]) == 0
    out = tmp_path / "merged"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter_tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    assert tokenizer.chat_template == adapter_tokenizer.chat_template
    for name in [p.name for p in (run / "adapter").iterdir() if p.name.startswith(("tokenizer", "chat_template"))]:
        assert (out / name).read_bytes() == (run / "adapter" / name).read_bytes(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")), "no pickle files"
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "lora-tune" in card
    assert "train loss" in card and "max |logit difference|" in card


def test_the_bases_sentencepiece_model_joins_the_merged_tokenizer(tiny_model_dir: Path, tmp_path: Path):
    """transformers 5 saves no tokenizer.model with the adapter; llama.cpp's converter needs it (Gemma 2, Phi-3)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    run = make_run(tmp_path, base, lora())
    assert not (run / "adapter" / "tokenizer.model").exists()
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--no-verify"]) == 0
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"


def test_tied_embeddings_stay_tied_unless_the_adapter_changes_lm_head(tiny_model_dir: Path, tmp_path: Path):
    base = save_base(tiny_model_dir, tmp_path / "tied-base", tied=True)
    run = make_run(tmp_path / "a", base, lora())
    result = merge(run, tmp_path / "a" / "merged", dtype="fp32", verify=False)
    assert result.untied == []
    assert json.loads((tmp_path / "a" / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    assert logit_diff(tmp_path / "a" / "merged", run, base) < 1e-4

    run = make_run(tmp_path / "b", base, lora(modules_to_save=["lm_head"]))
    result = merge(run, tmp_path / "b" / "merged", dtype="fp32", verify=False)
    assert result.untied == ["lm_head.weight"]
    assert json.loads((tmp_path / "b" / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert logit_diff(tmp_path / "b" / "merged", run, base) < 1e-4


def test_interrupted_merge_leaves_no_partial_output_and_keeps_the_old_one(
    sharded_base: Path, tmp_path: Path, monkeypatch
):
    import lora_tune.export.merging as merge_module

    run = make_run(tmp_path, sharded_base, lora())
    out = tmp_path / "merged"
    merge(run, out, verify=False)  # the previous merge, which the interrupted one must leave as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []
    real_write = merge_module.write_shard

    def crash_on_second(path: Path, specs: dict, tensors) -> int:  # noqa: ANN001 - an iterator
        calls.append(path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, specs, tensors)

    monkeypatch.setattr(merge_module, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        merge(run, out, overwrite=True, verify=False)
    assert names(tmp_path) == ["merged", "run"], "no temporary folder left behind"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_an_earlier_merge_is_replaced_only_with_overwrite(tiny_model_dir: Path, tmp_path: Path, capsys):
    run = make_run(tmp_path, tiny_model_dir, lora())
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out), "--no-verify"]) == 0
    (out / "config.json").write_text("{}")  # an earlier merge, changed: the name is still the merge's own
    capsys.readouterr()
    assert main(["merge", str(run), "--output", str(out)]) == 2
    assert "holds an earlier merge; pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(run), "--output", str(run / "adapter")]) == 2
    assert "overlaps" in capsys.readouterr().err
    assert (out / "config.json").read_text() == "{}"
    assert main(["merge", str(run), "--output", str(out), "--overwrite", "--no-verify"]) == 0
    assert (out / "config.json").read_text() != "{}"


def test_a_folder_with_anything_else_is_refused_even_with_overwrite(tiny_model_dir: Path, tmp_path: Path, capsys):
    run = make_run(tmp_path, tiny_model_dir, lora())
    out = tmp_path / "merged"
    out.mkdir()
    (out / "something").write_text("x")
    for flags in ([], ["--overwrite"]):
        assert main(["merge", str(run), "--output", str(out), "--no-verify", *flags]) == 2
        assert "holds no lora-tune merged model folder (something)" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["something"] and (out / "something").read_text() == "x"


def test_not_enough_disk_is_refused_before_writing(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    import shutil
    from collections import namedtuple

    run = make_run(tmp_path, tiny_model_dir, lora())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough free disk"):
        merge(run, tmp_path / "merged")
    assert names(tmp_path) == ["run"]


def test_prompt_tuning_adapter_gives_a_clear_error(tiny_model_dir: Path, tmp_path: Path, capsys):
    from peft import PromptTuningConfig

    run = make_run(tmp_path, tiny_model_dir, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    capsys.readouterr()
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "prompt_tuning adapter" in err and "cannot be merged" in err and "lora-tune push" in err


def test_other_adapter_types_fall_back_to_peft(tiny_model_dir: Path, tmp_path: Path, caplog):
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    run = make_run(tmp_path, tiny_model_dir, config)
    import torch
    from safetensors.torch import load_file, save_file

    # IA3 vectors start at 1 (identity); move them so the merge matters.
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    save_file(
        {k: v + 0.3 * torch.rand_like(v) for k, v in weights.items()}, run / "adapter" / "adapter_model.safetensors"
    )
    result = merge(run, tmp_path / "merged", dtype="fp32")
    assert result.method == "peft merge_and_unload"
    assert "holds the whole model" in caplog.text
    assert logit_diff(tmp_path / "merged", run, tiny_model_dir) < 1e-4


def test_a_wrong_merge_fails_verification_and_writes_nothing(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    from lora_tune.export import VerificationError
    from lora_tune.export.streaming import LoraUpdate

    run = make_run(tmp_path, tiny_model_dir, lora())
    real_delta = LoraUpdate.delta
    monkeypatch.setattr(LoraUpdate, "delta", lambda self, fan_in_fan_out: 3 * real_delta(self, fan_in_fan_out))
    with pytest.raises(VerificationError, match="verification failed"):
        merge(run, tmp_path / "merged", dtype="bf16")
    assert names(tmp_path) == ["run"]


def make_resized_run(root: Path, base_dir: Path, modules_to_save: list[str], peft_config=None) -> tuple[Path, int]:  # noqa: ANN001
    """A run whose tokenizer got new tokens and whose embeddings were resized before peft wrapped the model."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / "run"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.add_tokens(["<fruit>", "<veg>", "<nut>", "<berry>"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(model, peft_config or lora(modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name or "ia3_l" in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "recipe.yaml").write_text(RECIPE.format(model=base_dir, out=run))
    (run / "summary.json").write_text(json.dumps({"steps": 3, "train_loss": 1.5, "eval_loss": None}))
    return run, len(tokenizer)


def resized_reference_diff(merged: Path, run: Path, base_dir: Path, vocab: int) -> float:
    """Max |logit difference| of the merged folder vs base (resized to `vocab`) + adapter, on new tokens too."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, :4] = torch.arange(vocab - 4, vocab)  # the added tokens
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        base.resize_token_embeddings(vocab)
        reference = PeftModel.from_pretrained(base, run / "adapter")(ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        assert merged_model.get_input_embeddings().weight.shape[0] == vocab
        merged_logits = merged_model(ids).logits
    assert merged_logits.shape[-1] == vocab
    return float((merged_logits - reference).abs().max())


def test_added_tokens_with_resized_embeddings_survive_the_merge(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    run, vocab = make_resized_run(tmp_path, tiny_model_dir, ["embed_tokens", "lm_head"])
    base_vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert vocab == base_vocab + 4
    result = merge(run, tmp_path / "merged", dtype="fp32")  # verification resizes the reference base too
    assert result.method == "streaming" and result.vocab_size == vocab and result.replaced_tensors == 2
    assert result.max_abs_diff <= result.tolerance
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == vocab
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == vocab
    assert resized_reference_diff(tmp_path / "merged", run, tiny_model_dir, vocab) < 1e-4


def test_resized_embeddings_on_a_tied_base_merge_and_verify(tiny_model_dir: Path, tmp_path: Path):
    # peft also saves the resized (tied) embedding layers here, so the streaming merge has every resized tensor;
    # without them it would fall back to peft's merge_and_unload (see merging.resized_vocab).
    base = save_base(tiny_model_dir, tmp_path / "tied-base", tied=True)
    run, vocab = make_resized_run(tmp_path, base, ["embed_tokens"])
    result = merge(run, tmp_path / "merged", dtype="fp32")
    assert result.max_abs_diff <= result.tolerance and result.vocab_size == vocab
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == vocab


def test_lora_factors_on_a_resized_embedding_merge_by_streaming(tiny_model_dir: Path, tmp_path: Path):
    # peft saves a LoRA-targeted resized embedding as `<layer>.base_layer.weight` next to its LoRA factors.
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["embed_tokens", "q_proj", "lm_head"])
    run, vocab = make_resized_run(tmp_path, tiny_model_dir, [], config)
    result = merge(run, tmp_path / "merged", dtype="fp32")
    assert result.method == "streaming" and result.vocab_size == vocab and result.lora_modules == 4
    assert result.max_abs_diff <= result.tolerance
    assert resized_reference_diff(tmp_path / "merged", run, tiny_model_dir, vocab) < 1e-4


def test_resized_embeddings_with_an_adapter_peft_merges(tiny_model_dir: Path, tmp_path: Path):
    from peft import IA3Config

    config = IA3Config(
        target_modules=["down_proj"], feedforward_modules=["down_proj"], modules_to_save=["embed_tokens", "lm_head"]
    )
    run, vocab = make_resized_run(tmp_path, tiny_model_dir, [], config)
    result = merge(run, tmp_path / "merged", dtype="fp32")
    assert result.method == "peft merge_and_unload" and result.vocab_size == vocab
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == vocab
    assert resized_reference_diff(tmp_path / "merged", run, tiny_model_dir, vocab) < 1e-4


def test_the_merged_generation_config_stops_on_the_trained_end_of_turn(tiny_model_dir: Path, tmp_path: Path):
    """A base whose generation config names only its EOS still gives a merged model that stops at the end-of-turn
    token training taught (preflight.json's stop tokens)."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    end_of_turn = "<|assistant|>"  # any special token other than EOS stands for a template's end-of-turn marker
    assert tokenizer.convert_tokens_to_ids(end_of_turn) != tokenizer.eos_token_id
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
    run = make_run(tmp_path, base, lora())
    (run / "preflight.json").write_text(json.dumps({"stop_tokens": [end_of_turn]}))
    merge(run, tmp_path / "merged", dtype="fp32", verify=False)
    stops = json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]


def test_a_base_without_a_generation_config_keeps_its_eos_beside_the_trained_end_of_turn(
    tiny_model_dir: Path, tmp_path: Path
):
    """transformers reads config.json's eos_token_id when a model has no generation_config.json; the one merge
    writes lists that EOS too, or the merged model would no longer stop on it."""
    from transformers import AutoTokenizer, GenerationConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "generation_config.json").unlink()
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert json.loads((base / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    run = make_run(tmp_path, base, lora())
    (run / "preflight.json").write_text(json.dumps({"stop_tokens": ["<|assistant|>"]}))
    merge(run, tmp_path / "merged", dtype="fp32", verify=False)
    stops = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert stops == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|assistant|>")]


def test_the_merge_summary_says_the_push_command_unless_a_push_follows():
    from lora_tune.export.result import MergeResult, format_merge

    merged = MergeResult(Path("m"), "bf16", "streaming", 1, 14, 0, [], max_abs_diff=1e-6, tolerance=1e-3, seconds=2)
    text = format_merge(merged)
    assert text.startswith("Merged model written to m  (streaming, bf16, 1 shard(s), 14 adapted weights, 2.0s)")
    assert "  verified: max |logit difference| 1e-06 (tolerance 0.001)" in text
    assert text.endswith("Next:\n  lora-tune push m ORG/NAME --dry-run")
    assert "Next:" not in format_merge(merged, next_step=False)
