"""Packing: packed examples do not attend to each other on the CPU path, and padding is counted right."""

from __future__ import annotations

import random

import pytest

from lora_tune.data.packing import batching_stats, bfd_rows, packing_plan, sft_packing_args
from lora_tune.recipe.schema import Recipe

LENGTHS = [9, 5, 13, 7]  # four examples; packed into rows of 16 by TRL's BFD: [13], [9, 7], [5]


@pytest.fixture(scope="module")
def tiny_llama():
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer

    tokenizer = build_tokenizer(["a b c d e f g h i j k"] * 20, vocab_size=300)
    return build_tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1).eval()


def packed_batch(vocab_size: int = 100):
    """The batch SFTTrainer feeds the model for LENGTHS: TRL's own BFD packing and padding-free collator."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rng = random.Random(0)
    examples = [[rng.randrange(10, vocab_size) for _ in range(n)] for n in LENGTHS]
    dataset = Dataset.from_dict({"input_ids": examples, "labels": examples})
    packed = pack_dataset(dataset, seq_length=16, strategy="bfd", map_kwargs={})
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return examples, collator([packed[i] for i in range(len(packed))])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_packed_example_has_the_logits_it_has_alone(tiny_llama, attn: str) -> None:
    import torch

    tiny_llama.set_attn_implementation(attn)
    examples, batch = packed_batch(tiny_llama.config.vocab_size)
    ids, positions = batch["input_ids"], batch["position_ids"]
    assert ids.shape == (1, sum(LENGTHS)) and "attention_mask" not in batch  # one flat, padding-free row
    model_inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = tiny_llama(**model_inputs, use_cache=False).logits[0]  # as SFTTrainer.compute_loss calls it
        plain = tiny_llama(input_ids=ids, use_cache=False).logits[0]  # same tokens, no position ids: one sequence
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    found = 0
    leaked = False
    for start, end in zip(starts, starts[1:], strict=False):
        tokens = ids[0, start:end].tolist()
        assert tokens in examples
        with torch.no_grad():
            alone = tiny_llama(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
        torch.testing.assert_close(packed[start:end], alone, atol=1e-5, rtol=1e-5)
        leaked |= start > 0 and not torch.allclose(plain[start:end], alone, atol=1e-3)
        found += 1
    assert found == len(LENGTHS)
    assert leaked, "control: without packed position ids, later examples would see earlier ones"


def test_collator_never_trains_across_examples() -> None:
    _, batch = packed_batch()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert (batch["labels"][0, starts] == -100).all()  # the first token of an example is not predicted from another


def test_bfd_rows_match_trl() -> None:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = random.Random(3)
    lengths = [rng.randint(1, 40) for _ in range(300)]
    dataset = Dataset.from_dict({"input_ids": [[1] * n for n in lengths]})
    trl_rows = pack_dataset(dataset, seq_length=48, strategy="bfd", map_kwargs={"batch_size": 1000})
    ours = bfd_rows(lengths, 48)
    assert len(ours) == len(trl_rows)
    assert sorted(i for row in ours for i in row) == list(range(300))
    assert all(sum(lengths[i] for i in row) <= 48 for row in ours)


def test_padding_fraction_padded_and_packed() -> None:
    padded = batching_stats([2, 4, 6, 8], 2, packed=False, max_length=None, seed=0)
    assert padded.tokens == 20 and padded.steps == 2
    # whatever the shuffled order, padding = sum over batches of (longest x size - real tokens)
    assert padded.pad_tokens in {4, 8, 12} and padded.padding_fraction == padded.pad_tokens / (20 + padded.pad_tokens)
    same = batching_stats([5, 5, 5, 5], 2, packed=False, max_length=None)
    assert same.padding_fraction == 0.0
    packed = batching_stats([2, 4, 6, 8], 2, packed=True, max_length=10)
    assert packed.padding_fraction == 0.0 and packed.rows == 2 and packed.steps == 1
    assert "packed: 0.0% padding (1 batches, 2 packed rows)" == packed.describe()


def recipe(**training) -> Recipe:
    return Recipe.model_validate(
        {"model": {"name": "m"}, "datasets": [{"path": "d.jsonl"}], "output_dir": "o", "training": training}
    )


def test_packing_plan_and_trl_args() -> None:
    packed = {"packing": True, "packing_strategy": "bfd", "padding_free": True}
    assert sft_packing_args(recipe()) == packed  # the default
    assert sft_packing_args(recipe(packing=False)) == {"packing": False}
    # a default packing without max_length is simply off; asking for it explicitly is a recipe error
    assert sft_packing_args(recipe(max_length=None)) == {"packing": False}
    plan = packing_plan(recipe(packing=True))
    assert plan.enabled and "auto: flash-attention varlen kernels, SDPA per example or SDPA's block" in plan.reason


def test_sft_config_packs_padding_free(tmp_path) -> None:
    import torch

    from lora_tune.training.trl_args import to_sft_config

    config = to_sft_config(recipe(packing=True, max_length=64), tmp_path, torch.float32)
    assert (config.packing, config.packing_strategy, config.padding_free) == (True, "bfd", True)
    assert to_sft_config(recipe(packing=False), tmp_path, torch.float32).packing is False


def test_packing_falls_back_for_remote_code(caplog) -> None:
    r = Recipe.model_validate(
        {
            "model": {"name": "m", "trust_remote_code": True},
            "datasets": [{"path": "d.jsonl"}],
            "output_dir": "o",
            "training": {"packing": True},
        }
    )
    assert sft_packing_args(r) == {"packing": False}
    assert "packing turned off: the model runs its own code" in caplog.text


def test_packed_training_run_through_the_cli(tiny_model_dir, tmp_path, capsys) -> None:
    """train with packing: TRL gets padding-free BFD rows, the run logs its padding fraction, and finishes."""
    from lora_tune.cli import main
    from tests.conftest import fruit_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", fruit_rows(24, "messages"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  name: {tiny_model_dir}\n  dtype: float32\n  chat_template: chatml\n"
        f"datasets:\n  - path: {data}\n"
        "training:\n  max_steps: 2\n  batch_size: 2\n  max_length: 128\n  packing: true\n  train_on: all\n"
        "  gradient_checkpointing: false\n  save_strategy: 'no'\n"
        f"preflight:\n  on_failure: warn\noutput_dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "batching: packed: 0.0% padding" in out and "[this run]; padded: " in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
