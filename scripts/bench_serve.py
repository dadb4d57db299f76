"""Benchmark: `lora-tune serve` on the CPU, requests one after another vs several at once.

A tiny Llama is built locally and saved as a model folder; `lora-tune serve` runs it in a subprocess and the openai
client sends streamed chat requests (greedy, a fixed answer length: the model never ends its turn early, so every
request makes exactly --max-tokens tokens). Printed: requests/s, generated tokens/s, and time to first token (the
first content chunk) as median and 90th percentile, for the sequential and the concurrent case.

    PYTHONPATH=. .venv/bin/python scripts/bench_serve.py                          # hidden 256, 4 layers
    PYTHONPATH=. .venv/bin/python scripts/bench_serve.py --concurrency 8 --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def build_model(folder: Path, hidden: int, layers: int) -> None:
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer

    rng = random.Random(0)
    words = ["apple", "pear", "sky", "blue", "one", "two", "three", "fox", "dog", "the", "is", "a", "of"]
    tokenizer = build_tokenizer([" ".join(rng.choices(words, k=12)) for _ in range(200)], vocab_size=320)
    build_tiny_llama(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def start(folder: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lora_tune", "serve", str(folder), "--port", "0", "--model-name", "bench"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in process.stdout:
        if match := re.search(r"listening on (http://\S+)", line):
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # drain its log
            return process, match.group(1)
    raise SystemExit("the server did not start")


def one_request(client, question: str, max_tokens: int) -> tuple[float, float, int]:  # noqa: ANN001 - OpenAI
    """(seconds to the first content chunk, seconds in all, tokens generated) of one streamed request."""
    began, first = time.perf_counter(), None
    stream = client.chat.completions.create(
        model="bench",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = 0
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - began
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first or float("nan"), time.perf_counter() - began, tokens


def run_case(client, requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:  # noqa: ANN001
    results: list[tuple[float, float, int]] = []
    questions = [f"question number {i}: what is the colour of the sky?" for i in range(requests)]
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        for question in mine:
            result = one_request(client, question, max_tokens)
            with lock:
                results.append(result)

    began = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(questions[i::concurrency],)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ttft = sorted(r[0] for r in results)
    return {
        "requests/s": requests / wall,
        "tokens/s": sum(r[2] for r in results) / wall,
        "ttft median ms": 1000 * statistics.median(ttft),
        "ttft p90 ms": 1000 * ttft[int(0.9 * (len(ttft) - 1))],
        "latency median ms": 1000 * statistics.median(r[1] for r in results),
        "tokens per answer": statistics.mean(r[2] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_model(folder, args.hidden, args.layers)
        process, url = start(folder)
        try:
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            one_request(client, "warm up", args.max_tokens)
            cases = {
                "sequential (1 client)": run_case(client, args.requests, 1, args.max_tokens),
                f"concurrent ({args.concurrency} clients)": run_case(
                    client, args.requests, args.concurrency, args.max_tokens
                ),
            }
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=120)
    print(
        f"tiny Llama hidden {args.hidden}, {args.layers} layers; {args.requests} streamed chat requests, greedy, "
        f"{args.max_tokens} tokens each; server exit code {code}"
    )
    names = list(next(iter(cases.values())))
    print("| | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for case, figures in cases.items():
        print(f"| {case} | " + " | ".join(f"{figures[n]:.1f}" for n in names) + " |")


if __name__ == "__main__":
    main()
