"""Benchmark: `lora-tune serve` on the CPU with 1, 4 and 16 concurrent clients, the old server against this one.

A tiny Llama is built locally and saved as a model folder; `lora-tune serve` runs it in a subprocess and the openai
client sends streamed chat requests (greedy, a fixed answer length: the model never ends its turn early, so every
request makes exactly --max-tokens tokens). Each server is measured in the same run: this checkout's, and the
server of git revision --old-ref (the last one on the standard library's ThreadingHTTPServer with one generation
thread), extracted with `git archive` into a temporary folder. Printed: requests/s, generated tokens/s, time to
first token (the first content chunk) as median and 90th percentile, and the ratios the issue asks about (4 clients'
requests/s over 1 client's; 16 clients' median time to first token over 1 client's).

    PYTHONPATH=. .venv/bin/python scripts/bench_serve.py                          # hidden 256, 4 layers
    PYTHONPATH=. .venv/bin/python scripts/bench_serve.py --clients 1,4,16 --requests 32 --max-tokens 64
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


OLD_REF = "1957b6f"  # the last commit whose server was http.server + one generation thread (issue 30)
RUN_CODE = "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('lora_tune', run_name='__main__')"


def old_code(ref: str, into: Path) -> Path:
    """The lora_tune package of git revision `ref`, extracted into `into`."""
    archive = subprocess.run(["git", "archive", ref, "lora_tune"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def start(folder: Path, code: Path = ROOT) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", RUN_CODE, str(code), "serve", str(folder), "--port", "0", "--model-name", "bench"]
    env = {**os.environ, "PYTHONPATH": str(code)}
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


def measure(folder: Path, code: Path, clients: list[int], requests: int, max_tokens: int) -> dict:
    import openai

    process, url = start(folder, code)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        for _ in range(2):
            one_request(client, "warm up", max_tokens)
        cases = {n: run_case(client, max(requests, n), n, max_tokens) for n in clients}
    finally:
        process.send_signal(signal.SIGTERM)
        began = time.perf_counter()
        code_ = process.wait(timeout=120)
    for figures in cases.values():
        figures["exit s"] = time.perf_counter() - began
        figures["exit code"] = code_
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32, help="requests per case (at least one per client)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients of each case")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the server to compare with")
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "tiny"
        build_model(folder, args.hidden, args.layers)
        old = old_code(args.old_ref, Path(tmp))
        results = {
            f"old ({args.old_ref})": measure(folder, old, clients, args.requests, args.max_tokens),
            "new": measure(folder, ROOT, clients, args.requests, args.max_tokens),
        }
    print(
        f"tiny Llama hidden {args.hidden}, {args.layers} layers; {args.requests} streamed chat requests per case, "
        f"greedy, {args.max_tokens} tokens each; os.cpu_count() {os.cpu_count()}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    names = ["requests/s", "tokens/s", "ttft median ms", "ttft p90 ms", "latency median ms"]
    print("| server | clients | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 2) + "|")
    for server, cases in results.items():
        for n, figures in cases.items():
            print(f"| {server} | {n} | " + " | ".join(f"{figures[k]:.1f}" for k in names) + " |")
    for server, cases in results.items():
        one = cases[clients[0]]
        ratios = [
            f"{n} clients: {cases[n]['requests/s'] / one['requests/s']:.2f}x the requests/s, "
            f"{cases[n]['ttft median ms'] / one['ttft median ms']:.2f}x the median time to first token"
            for n in clients[1:]
        ]
        exit_s = next(iter(cases.values()))["exit s"]
        print(f"{server}: vs {clients[0]} client: " + "; ".join(ratios) + f"; SIGTERM to exit {exit_s:.2f} s")
    new, old = results["new"], results[f"old ({args.old_ref})"]
    print(
        "new vs old, requests/s: "
        + ", ".join(f"{n} clients {new[n]['requests/s'] / old[n]['requests/s']:.2f}x" for n in clients)
    )


if __name__ == "__main__":
    main()
