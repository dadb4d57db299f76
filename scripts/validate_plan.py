#!/usr/bin/env python
"""Check `lora-tune plan` against torch.cuda.max_memory_allocated on a CUDA GPU (the goal: within 15%).

    python scripts/validate_plan.py [--hidden 2048 --layers 16 --vocab 128256] [--steps 4] [--only NAME]

Builds a Llama-shaped model with random weights (values do not change memory) and a long synthetic chat set, then
for each variant below runs an SFT run (`lora_tune.train`) for a few steps in a fresh subprocess (clean CUDA
statistics) and prints the planner's allocator estimate (`MemoryPlan.allocated`: the peak minus CUDA context,
allocator slack and paged optimizer state, which torch's counter does not see) beside the measured peak, and the
error. Every row of
data is longer than max_length, so each step reaches the planner's worst case of batch_size x max_length tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "qlora-ckpt-b2-1024": ["training.batch_size=2", "training.max_length=1024"],
    "qlora-nockpt-b1-1024": [
        "training.batch_size=1",
        "training.max_length=1024",
        "training.gradient_checkpointing=false",
    ],
    "qlora-ckpt-b4-2048": ["training.batch_size=4", "training.max_length=2048"],
    "lora-bf16-ckpt-b2-1024": ["training.batch_size=2", "training.max_length=1024", "quantization.bits=null"],
    "qlora-ckpt-b2-1024-adamw": [
        "training.batch_size=2",
        "training.max_length=1024",
        "training.optimizer=adamw_torch",
    ],
}
RECIPE = """\
model: {{name: {model}, dtype: bfloat16}}
quantization: {{bits: 4}}
adapter: {{r: 16, alpha: 32, target_modules: all-linear}}
datasets: [{{path: {data}, format: messages}}]
training: {{max_steps: {steps}, logging_steps: 1, save_strategy: "no", optimizer: paged_adamw_8bit}}
preflight: {{on_failure: warn}}
output_dir: {out}
"""


def model_config(hidden: int, layers: int, vocab: int, **special_tokens: int) -> object:
    """The benchmark's shape: Llama, GQA 4:1, untied, MLP 4x hidden (scripts/gpu_check.py plans the same one)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        **special_tokens,
    )


def build_assets(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    """A random bf16 Llama (GQA 4:1, untied, MLP 4x hidden) and 64 chats of ~6,000 words each."""
    import random

    import torch
    from transformers import LlamaForCausalLM

    from lora_tune.quickstart.tiny import build_tokenizer

    words = [f"w{i}" for i in range(400)]
    tokenizer = build_tokenizer([" ".join(words)] * 4, vocab_size=600)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    config = model_config(hidden, layers, vocab, **{name: getattr(tokenizer, name) for name in ids})
    model_dir = root / "model"
    with torch.device("cuda"):
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = []
    for _ in range(64):
        answer = " ".join(rng.choice(words) for _ in range(6000))
        rows.append({"messages": [{"role": "user", "content": "say words"}, {"role": "assistant", "content": answer}]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def run_variant(recipe_path: Path, overrides: list[str]) -> dict[str, float]:
    """In this process: plan, train, and report both figures (GiB)."""
    import torch

    from lora_tune import train
    from lora_tune.plan.memory import GIB, plan
    from lora_tune.recipe.load import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    planned = plan(recipe, gpu_memory="1000GiB")
    torch.cuda.reset_peak_memory_stats()
    train(recipe, overwrite=True)
    measured = torch.cuda.max_memory_allocated() / GIB
    return {
        "planned_allocated_gib": planned.allocated / GIB,
        "planned_total_gib": planned.total / GIB,
        "measured_gib": measured,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append", help="run only these variants")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(Path(args.child[0]), VARIANTS[args.child[1]])), flush=True)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("validate_plan.py needs a CUDA GPU (the CPU checks are tests/unit/plan/test_memory.py)")
        return 2
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = build_assets(root, args.hidden, args.layers, args.vocab)
        for name in args.only or VARIANTS:
            recipe = root / f"{name}.yaml"
            recipe.write_text(RECIPE.format(model=model_dir, data=data, steps=args.steps, out=root / "runs" / name))
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(recipe), name], capture_output=True, text=True
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{name}: failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
                continue
            results[name] = json.loads(lines[-1].removeprefix("RESULT "))
    print(
        f"\nGPU: {torch.cuda.get_device_name(0)}; model: hidden {args.hidden}, {args.layers} layers, "
        f"vocab {args.vocab}"
    )
    print(
        "| variant | planned (allocator) GiB | measured max_memory_allocated GiB | error | "
        "planned peak incl. context GiB |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        error = r["planned_allocated_gib"] / r["measured_gib"] - 1
        print(
            f"| {name} | {r['planned_allocated_gib']:.2f} | {r['measured_gib']:.2f} | {error:+.1%} | "
            f"{r['planned_total_gib']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
