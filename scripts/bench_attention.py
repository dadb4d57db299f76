#!/usr/bin/env python
"""Attention on a packed row: transformers' SDPA with its block-diagonal mask vs lora-tune's per-example SDPA.

    python scripts/bench_attention.py [--lengths 170,150,120,72] [--steps 10] [--repeats 2]

One padding-free row holding several examples (position ids restarting at 0, the boundaries TRL's collator sends),
forward + backward with non-reentrant gradient checkpointing on a 4-layer, hidden-256 Llama (the shape of
scripts/bench_train.py's CPU model), `--steps` times per measurement; the two sides alternate `--repeats` times.
Prints the seconds per side, the ratio, and the largest loss and gradient differences between the two (they
compute the same thing). Also times four rows one at a time against the same four rows flattened into one, both
per-example, which is why packed rows go one per forward pass on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lora_tune.model import attention as varlen_attention

CONFIG = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, vocab_size=478)


def model_with(attention: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=8192, **CONFIG))
    model.set_attn_implementation(attention)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def packed(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, sum(lengths)), generator=generator)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return {
        "input_ids": ids,
        "labels": ids,
        "position_ids": positions,
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
    }


def step(model: LlamaForCausalLM, rows: list[dict[str, torch.Tensor]]) -> float:
    loss = 0.0
    for row in rows:
        out = model(**row, use_cache=False)
        out.loss.backward()
        loss = out.loss.item()
    return loss


def timed(model: LlamaForCausalLM, rows: list[dict[str, torch.Tensor]], steps: int) -> float:
    step(model, rows)  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step(model, rows)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="170,150,120,72")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.set_num_threads(1)
    varlen_attention.register()
    row = packed(lengths)

    # Same computation: loss and gradients of one pass on each side.
    grads = {}
    for attention in ("sdpa", varlen_attention.NAME):
        model = model_with(attention)
        grads[attention] = (step(model, [row]), [p.grad.clone() for p in model.parameters()])
    loss_diff = abs(grads["sdpa"][0] - grads[varlen_attention.NAME][0])
    pairs = zip(grads["sdpa"][1], grads[varlen_attention.NAME][1], strict=True)
    grad_diff = max((a - b).abs().max().item() for a, b in pairs)

    times: dict[str, list[float]] = {"sdpa": [], varlen_attention.NAME: []}
    for _ in range(args.repeats):
        for attention in times:
            times[attention].append(timed(model_with(attention), [row], args.steps))
    mask, per_example = (statistics.median(times[a]) for a in ("sdpa", varlen_attention.NAME))
    print(f"packed row of {sum(lengths)} tokens ({len(lengths)} examples), {args.steps} forward+backward passes:")
    print(f"  sdpa (block-diagonal mask): {mask:.2f} s  runs {', '.join(f'{t:.2f}' for t in times['sdpa'])}")
    runs = ", ".join(f"{t:.2f}" for t in times[varlen_attention.NAME])
    print(f"  sdpa_varlen (per example):  {per_example:.2f} s  runs {runs}")
    print(f"  speed-up {mask / per_example:.2f}x; max |loss diff| {loss_diff:.1e}, max |grad diff| {grad_diff:.1e}")

    rows = [packed(lengths, seed) for seed in range(4)]
    flat = packed(lengths * 4)
    one_at_a_time = statistics.median(timed(model_with(varlen_attention.NAME), rows, 3) for _ in range(args.repeats))
    flattened = statistics.median(timed(model_with(varlen_attention.NAME), [flat], 3) for _ in range(args.repeats))
    print(f"four rows, 3 steps, per-example SDPA: one at a time {one_at_a_time:.2f} s, flattened {flattened:.2f} s")


if __name__ == "__main__":
    main()
