"""Batched (left-padded) generation against one prompt at a time, on a locally built tiny Llama.

Measures both sides in one run and prints their times, the ratio, and whether the answers are identical:

    python scripts/bench_eval.py --prompts 64 --batch-size 16 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_tune.inference.answers import generate_answers
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer
    from lora_tune.recipe.schema import EvalConfig

    words = "the quick brown fox jumps over a lazy dog while seven red apples fall from one tall tree".split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(words, k=12)) for _ in range(200)]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = build_tokenizer(corpus, vocab_size=320)
        model = build_tiny_llama(tokenizer, hidden_size=args.hidden_size, num_layers=args.layers, num_heads=4)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(Path(folder))
        tokenizer = AutoTokenizer.from_pretrained(Path(folder))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # sharp logits: greedy choices are not near-ties
    # Prompts of varied length, so batches need padding.
    prompts = [
        [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 30)))}] for _ in range(args.prompts)
    ]

    def run(batch_size: int) -> tuple[float, list[str]]:
        settings = EvalConfig(max_new_tokens=args.max_new_tokens, batch_size=batch_size, stop_on_eos=False)
        started = time.perf_counter()
        answers = generate_answers(model, tokenizer, prompts, settings=settings, progress=False)
        return time.perf_counter() - started, answers

    run(args.batch_size)  # warm-up
    batched_s, batched = run(args.batch_size)
    single_s, single = run(1)
    print(f"{args.prompts} prompts, {args.max_new_tokens} new tokens each, torch threads {torch.get_num_threads()}")
    print(f"  one at a time      {single_s:7.2f} s  ({args.prompts / single_s:6.1f} prompts/s)")
    print(f"  batches of {args.batch_size:<3}     {batched_s:7.2f} s  ({args.prompts / batched_s:6.1f} prompts/s)")
    print(f"  speed-up {single_s / batched_s:.2f}x; identical answers: {batched == single}")


if __name__ == "__main__":
    main()
