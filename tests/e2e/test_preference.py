"""Preference tuning end to end on the tiny 4-bit model on the CPU, one run per objective (dpo, orpo, kto,
simpo): it trains from the same recipes as SFT, saves an adapter that vanilla peft reloads and that changes the
model, merges with verification, and a run killed mid-training resumes to the same adapter. On a pre-trained base,
preference data moves held-out reward accuracy and the greedy answers."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import FRUITS, write_jsonl
from tests.helpers import logged_losses, probe_logits, run_cli

RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 8
  alpha: 16
  dropout: 0.0
datasets:
  - path: {data}
val_size: 0.2
training:
  objective: {objective}
  learning_rate: 1.0e-2
  max_steps: {steps}
  batch_size: 4
  max_length: 64
  warmup_steps: 0
  logging_steps: 1
  eval_strategy: steps
  eval_steps: 4
  save_steps: 2
  gradient_checkpointing: false
output_dir: {out}
"""


def pair_rows(n: int) -> list[dict]:
    """The chosen answer names the fruit of the number; the rejected one names the next fruit."""
    return [
        {
            "prompt": f"fruit number {i % len(FRUITS)}?",
            "chosen": FRUITS[i % len(FRUITS)],
            "rejected": FRUITS[(i + 1) % len(FRUITS)],
        }
        for i in range(n)
    ]


def kto_rows(n: int) -> list[dict]:
    rows = []
    for pair in pair_rows(n // 2):
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def form_rows(n: int, start: int = 0) -> list[dict]:
    """A rule of form the base does not follow: the chosen answer is the fruit in capitals, the rejected one as is."""
    return [
        {
            "prompt": f"fruit number {i}?",
            "chosen": FRUITS[i % len(FRUITS)].upper(),
            "rejected": FRUITS[i % len(FRUITS)],
        }
        for i in range(start, start + n)
    ]


def write_recipe(
    root: Path, model: Path, objective: str, name: str, steps: int = 8, rows: list[dict] | None = None
) -> Path:
    rows = rows or (kto_rows(40) if objective == "kto" else pair_rows(40))
    data = write_jsonl(root / f"{objective}.jsonl", rows)
    path = root / f"{name}.yaml"
    path.write_text(RECIPE.format(model=model, data=data, objective=objective, steps=steps, out=root / name))
    return path


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "simpo"])
def test_objective_trains_saves_and_reloads_with_vanilla_peft(objective: str, tiny_model_dir: Path, tmp_path: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["train", str(write_recipe(tmp_path, tiny_model_dir, objective, "run"))]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == objective and summary["steps"] == 8
    assert len(logged_losses(run)) >= 7
    preflight = json.loads((run / "preflight.json").read_text())
    assert all(c["status"] != "fail" for c in preflight["checks"])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    before = probe_logits(base, tokenizer)
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    assert not torch.allclose(probe_logits(tuned, tokenizer), before, atol=1e-4)
    # The adapter merges like an SFT one, verified against base + adapter.
    assert main(["merge", str(run), "--output", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").num_parameters() > 0


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "simpo"])
def test_killed_mid_run_resumes_to_the_uninterrupted_adapter(objective: str, tiny_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file

    assert main(["train", str(write_recipe(tmp_path, tiny_model_dir, objective, "reference"))]) == 0
    recipe = write_recipe(tmp_path, tiny_model_dir, objective, "killed")
    killed = run_cli("train", str(recipe), fault=("kill-at-step", 5))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "adapter").exists()
    assert main(["train", str(recipe), "--resume"]) == 0
    reference = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert (resumed[name] - tensor).abs().max().item() < 1e-6, name


def test_check_counts_every_row_that_cannot_teach_a_preference(tiny_model_dir: Path, tmp_path: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, "dpo", "run")
    rows = pair_rows(40)
    for i in (3, 9, 20):
        rows[i]["rejected"] = rows[i]["chosen"]
    rows[12]["chosen"] = " "
    write_jsonl(tmp_path / "dpo.jsonl", rows)
    assert main(["check", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert f"{tmp_path / 'dpo.jsonl'} row 4 (and 2 more rows): 3 of 40 rows: chosen equals rejected" in out
    assert f"{tmp_path / 'dpo.jsonl'} row 13: 1 of 40 rows: chosen is empty" in out
    assert "2 checks failed (prefers-nothing, empty-answer)" in out


def test_pairs_that_prefer_nothing_stop_the_run_before_the_model_loads(tiny_model_dir: Path, tmp_path: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, "dpo", "run")
    data = tmp_path / "dpo.jsonl"
    rows = pair_rows(40)
    rows[6]["rejected"] = rows[6]["chosen"]
    write_jsonl(data, rows)
    assert main(["train", str(recipe)]) == 2
    assert "dpo.jsonl row 7: 1 of 40 rows: chosen equals rejected" in capsys.readouterr().err  # the pre-flight step


def test_eval_of_a_dpo_run_reports_base_and_tuned_on_held_out_pairs(tiny_model_dir: Path, tmp_path: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, "dpo", "run", steps=16, rows=form_rows(40))
    best = "save_steps: 4\n  keep_best: true\n  best_metric: rewards/accuracies\n"
    recipe.write_text(recipe.read_text().replace("save_steps: 2\n", best))
    assert main(["train", str(recipe)]) == 0
    held_out = write_jsonl(tmp_path / "held_out.jsonl", form_rows(18, start=100))  # numbers never trained on
    assert main(["eval", str(tmp_path / "run"), "--data", str(held_out)]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    tuned, base = report["tuned"]["preference"], report["base"]["preference"]
    print("held-out:", {"tuned": tuned, "base": base})
    assert report["task"] == "preference" and report["rows"] == 18
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["reward_accuracy"] <= 1.0 and summary["reward_margin"] is not None  # TRL's, in training
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in r for r in records)
    assert summary["best"]["metric"] == "eval_rewards/accuracies"  # keep_best chose the adapter by reward accuracy
    assert tuned["reward_accuracy"] >= 0.9, tuned  # the chosen answer gained over the base on held-out pairs
    assert tuned["preference_accuracy"] > base["preference_accuracy"], (tuned, base)
    assert tuned["chosen_logprob"] - tuned["rejected_logprob"] > base["chosen_logprob"] - base["rejected_logprob"]
    assert "reward accuracy" in capsys.readouterr().out
    assert "| prompt | chosen | base | fine-tuned |" in (tmp_path / "run" / "eval.md").read_text()


def test_check_and_data_show_the_pairs_as_the_trainer_tokenizes_them(tiny_model_dir: Path, tmp_path: Path, capsys):
    recipe = write_recipe(tmp_path, tiny_model_dir, "dpo", "run")
    assert main(["check", str(recipe)]) == 0
    checked = capsys.readouterr().out
    assert "pre-flight: 4 checks passed on 32 rows" in checked and "stop token <|end|>" in checked
    assert main(["data", str(recipe), "--n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "dpo: 32 training rows, 8 validation, 0 test" in shown
    assert "chosen: ⟦" in shown and "<|end|>" in shown  # the answer ends with the end-of-turn marker it trains
    cut = write_recipe(tmp_path, tiny_model_dir, "dpo", "cut")
    text = cut.read_text().replace("max_length: 64", "max_length: 12")
    cut.write_text(text)
    assert main(["check", str(cut)]) == 2
    found = capsys.readouterr().out
    assert "pairs become identical once max_length cuts them" in found
    assert f"truncated-identical  {tmp_path / 'dpo.jsonl'} row 1 (and 39 more rows)" in found  # named by file and row


def test_dpo_continues_an_sft_run_against_the_sft_policy(tiny_model_dir: Path, tmp_path: Path):
    """adapter.init_from: DPO trains the SFT run's adapter; the reference is that adapter frozen (TRL's "ref" copy),
    not the base; only the trained adapter is saved, and lineage names the SFT run."""
    from safetensors.torch import load_file

    from tests.conftest import fruit_rows

    sft_data = write_jsonl(tmp_path / "sft.jsonl", fruit_rows(40, "messages"))
    sft = tmp_path / "sft.yaml"
    sft.write_text(
        RECIPE.format(model=tiny_model_dir, data=sft_data, objective="sft", steps=4, out=tmp_path / "sft-run")
    )
    assert main(["train", str(sft)]) == 0
    dpo = write_recipe(tmp_path, tiny_model_dir, "dpo", "dpo-run")
    text = dpo.read_text().replace("  r: 8\n  alpha: 16\n  dropout: 0.0\n", f"  init_from: {tmp_path / 'sft-run'}\n")
    dpo.write_text(text)  # the SFT adapter's own settings stay
    assert main(["train", str(dpo)]) == 0
    adapter = tmp_path / "dpo-run" / "adapter"
    assert not (adapter / "ref").exists()  # the frozen reference copy is not part of the result
    lineage = json.loads((tmp_path / "dpo-run" / "lineage.json").read_text())
    assert str(tmp_path / "sft-run") in json.dumps(lineage)
    trained, start = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tmp_path / "sft-run" / "adapter" / "adapter_model.safetensors"),
    )
    assert trained.keys() == start.keys()
    assert any((trained[k] - start[k]).abs().max() > 0 for k in trained)  # DPO moved the SFT adapter


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_log_probs_train(objective: str, tiny_model_dir: Path, tmp_path: Path):
    recipe = write_recipe(tmp_path, tiny_model_dir, objective, "run", steps=4)
    recipe.write_text(
        recipe.read_text().replace("output_dir:", "preference:\n  precompute_ref_log_probs: true\noutput_dir:")
    )
    assert main(["train", str(recipe)]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4


@pytest.fixture(scope="module")
def pretrained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quickstart's base, pre-trained the same way for fewer steps (about 20 s): it writes prose about its
    made-up world and has never seen the answer form the preference data asks for."""
    from lora_tune.quickstart import world

    out = tmp_path_factory.mktemp("quickstart") / "base"
    world.build_base(out, steps=120, progress=False)
    return out


def test_orpo_on_a_pretrained_base_answers_in_the_preferred_form(pretrained_base: Path, tmp_path: Path):
    """Chosen answers follow a form the base never writes ("Answer: CITY"); rejected ones give the city alone.
    Measured: held-out reward accuracy 1.0 (the base's preference accuracy 0.0), and the tuned model's greedy
    answers take the form in 20 of 20 held-out prompts, the base's in none. DPO alone on this base moves the
    reward accuracy the same way but not the greedy answers: it lowers the rejected form more than it raises the
    chosen one, which is why DPO runs after an SFT stage (adapter.init_from)."""
    from lora_tune.quickstart import world

    facts = world.make_world()

    def rows(facts: list) -> list[dict]:
        return [
            {"prompt": f"What is the capital of {f.country}?", "chosen": f"Answer: {f.capital}", "rejected": f.capital}
            for f in facts
        ]

    recipe = write_recipe(tmp_path, pretrained_base, "orpo", "run", steps=60, rows=rows(facts[:80]))
    text = recipe.read_text().replace("learning_rate: 1.0e-2", "learning_rate: 1.0e-2\n  lr_scheduler: constant")
    recipe.write_text(text.replace("output_dir:", "eval:\n  examples: 20\n  max_new_tokens: 8\noutput_dir:"))
    assert main(["train", str(recipe)]) == 0
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows(facts[200:220]))  # countries never trained on
    assert main(["eval", str(tmp_path / "run"), "--data", str(held_out)]) == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["tuned"]["preference"]["reward_accuracy"] >= 0.9
    assert report["base"]["preference"]["preference_accuracy"] <= 0.5
    follows = [(e["base"].startswith("Answer:"), e["tuned"].startswith("Answer:")) for e in report["examples"]]
    assert len(follows) == 20
    assert sum(tuned for _, tuned in follows) >= 15 and sum(base for base, _ in follows) <= 2, report["examples"]
