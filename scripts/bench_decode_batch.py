#!/usr/bin/env python
"""What a wider decode batch costs on this machine: one decode step (one new token against a 64-token KV cache) of
scripts/bench_serve.py's model shape (a random Llama, hidden 256, 4 layers), batch 1 against batch 4, alternating,
medians of 5 x 35 steps. The ratio bounds what batching 4 clients can gain in requests/s: 4 / ratio.

    python scripts/bench_decode_batch.py
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def step_seconds(model: LlamaForCausalLM, batch: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, 64))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        token = torch.randint(0, model.config.vocab_size, (batch, 1))
        times = []
        for _ in range(40):
            started = time.perf_counter()
            model(token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - started)
    return statistics.median(times[5:])  # the first steps warm the allocator


def main() -> int:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    times: dict[int, list[float]] = {1: [], 4: []}
    for _ in range(5):
        for batch in times:
            times[batch].append(step_seconds(model, batch))
    one, four = statistics.median(times[1]), statistics.median(times[4])
    print(
        f"decode step: batch 1 {one * 1e3:.2f} ms, batch 4 {four * 1e3:.2f} ms: {four / one:.2f}x "
        f"(4 clients can gain at most {4 * one / four:.2f}x in requests/s); torch threads {torch.get_num_threads()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
