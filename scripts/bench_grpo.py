#!/usr/bin/env python
"""GRPO throughput: lora-tune's grpo run vs a plain TRL GRPOTrainer script, on the same model, data and settings.

    python scripts/bench_grpo.py [--steps N] [--repeats R] [--json FILE]

Both sides train LoRA (all linear layers, r 16) on a 4-layer, hidden-256 Llama with random weights (float32, the CPU
path) for N optimizer steps on the same prompts, with the same batch (8 completions: 2 prompts x 4 generations),
max_completion_length, learning rate, sampling temperature and one answer reward. Each run is a fresh subprocess and
the sides alternate (lora-tune, TRL, lora-tune, TRL...) so that machine load hits both alike. For each run: optimizer
steps per second and generated tokens per second of the training loop (the Trainer's train_runtime; generated tokens
from TRL's completions/mean_length), and peak RSS; then the medians and their ratios (lora-tune / TRL).

- lora-tune: `lora_tune.train(recipe)`: the lifecycle's pre-flight (every reward called before training), sealed
  checkpoints (save_steps), metrics.jsonl, completions.jsonl and the callbacks every run carries.
- TRL: the documented script: `GRPOTrainer(model, reward_funcs=[answer], args=GRPOConfig(...), peft_config=
  LoraConfig(...))`, checkpoints at the same steps, gradient checkpointing off as in the recipe (TRL's default is on,
  which alone costs a second forward per step).
Random weights rarely finish a completion early, so both generate max_completion_length tokens nearly always.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("lora-tune", "trl")
SHAPE = {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024}
SETTINGS = {"batch": 8, "generations": 4, "completion": 32, "lr": 1e-5, "save_steps": 5}
WORDS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum"]


def build_assets(root: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_tune.quickstart.tiny import build_tokenizer

    tokenizer = build_tokenizer([f"fruit number {i} is {w}" for i, w in enumerate(WORDS * 20)], vocab_size=400)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["heads"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"prompt": f"fruit number {i % 9}?", "answer": WORDS[i % 9]} for i in range(200)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_lora_tune(root: Path, steps: int, out: Path) -> dict:
    import lora_tune
    from lora_tune.recipe.load import load_recipe

    s = SETTINGS
    recipe_text = f"""\
model: {{name: {root / "model"}, dtype: float32}}
adapter: {{r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}}
datasets: [{{path: {root / "prompts.jsonl"}}}]
training:
  objective: grpo
  learning_rate: {s["lr"]}
  max_steps: {steps}
  batch_size: {s["batch"]}
  max_length: 128
  warmup_steps: 0
  logging_steps: 1
  save_steps: {s["save_steps"]}
  gradient_checkpointing: false
rl:
  num_generations: {s["generations"]}
  max_completion_length: {s["completion"]}
  rewards: [{{name: answer}}]
output_dir: {out}
"""
    path = out.parent / "grpo.yaml"
    path.write_text(recipe_text)
    lora_tune.train(load_recipe(path))
    return _figures([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])


def run_trl(root: Path, steps: int, out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    s = SETTINGS
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def answer(completions, answer, **kwargs):  # noqa: ANN001, ANN202 - TRL's reward signature
        return [float(c[0]["content"].strip().lower() == a) for c, a in zip(completions, answer, strict=True)]

    args = GRPOConfig(
        output_dir=str(out),
        learning_rate=s["lr"],
        max_steps=steps,
        per_device_train_batch_size=s["batch"],
        num_generations=s["generations"],
        max_completion_length=s["completion"],
        logging_steps=1,
        save_steps=s["save_steps"],
        warmup_steps=0,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # TRL's default is on; the recipe turns it off: the same work on both sides
        seed=42,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(root / "model"),
        reward_funcs=[answer],
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(root / "model"),
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    trainer.train()
    return _figures(trainer.state.log_history)


def _figures(records: list[dict]) -> dict:
    runtime = next(r["train_runtime"] for r in records if "train_runtime" in r)
    steps = max(int(r.get("step", 0)) for r in records)
    lengths = [r["completions/mean_length"] for r in records if "completions/mean_length" in r]
    generated = sum(lengths) * SETTINGS["batch"]
    return {
        "steps_per_s": steps / runtime,
        "generated_tokens_per_s": generated / runtime,
        "train_runtime_s": runtime,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def child(side: str, root: Path, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        figures = (run_lora_tune if side == "lora-tune" else run_trl)(root, steps, out)
    print("RESULT " + json.dumps(figures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, metavar=("SIDE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), args.steps)
        return 0
    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_assets(root)
        for repeat in range(args.repeats):
            for side in SIDES:
                started = time.monotonic()
                proc = subprocess.run(
                    [sys.executable, __file__, "--steps", str(args.steps), "--child", side, str(root)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode != 0 or line is None:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                figures = json.loads(line.removeprefix("RESULT "))
                results[side].append(figures)
                print(f"run {repeat + 1} {side:9}: {figures['steps_per_s']:.3f} steps/s, "
                      f"{figures['generated_tokens_per_s']:.1f} generated tokens/s, "
                      f"peak RSS {figures['peak_rss_gib']:.2f} GiB ({time.monotonic() - started:.0f} s)")  # fmt: skip
    medians = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()}
    ratio = {k: medians["lora-tune"][k] / medians["trl"][k] for k in medians["trl"]}
    print(f"median lora-tune / TRL: steps/s {ratio['steps_per_s']:.2f}x, generated tokens/s "
          f"{ratio['generated_tokens_per_s']:.2f}x, peak RSS {ratio['peak_rss_gib']:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "medians": medians, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
