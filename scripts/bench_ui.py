"""Benchmark: how quickly `lora-tune ui` answers, in a real headless Chromium (Debian's chromium via Playwright).

Two figures, each printed with what it is measured against:
- page load with N runs in the folder (default 50): from `page.goto` to the Runs table holding every run, median of
  --repeat loads, beside the same page over an empty folder. The runs are folders as a finished run leaves them for
  the page (marker, recipe, metrics.jsonl with --records records, summary.json): the page reads those files only.
- Start -> first chart point: from the click on Start to the loss chart's first point, beside the terminal's own
  time from `lora-tune train` to the first record in metrics.jsonl, for the same recipe (a tiny Llama, the
  quickstart's data, logging every step), so the UI's share (its 1 s poll, the page update) shows.

    .venv/bin/python scripts/bench_ui.py                 # 50 runs, 3 loads each, one training start
    .venv/bin/python scripts/bench_ui.py --runs 200 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LORA_TUNE_CHROMIUM", "/usr/bin/chromium")
RECIPE = """\
model:
  name: {base}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 8
datasets:
  - path: {data}
    format: alpaca
training:
  max_steps: 20
  batch_size: 2
  max_length: 64
  logging_steps: 1
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ui(cwd: Path, runs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "lora_tune", "ui", "--runs", str(runs), "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=5)
            return child, url
        except OSError:
            time.sleep(0.5)
    child.kill()
    raise SystemExit("the UI did not start")


def fake_runs(folder: Path, count: int, records: int) -> None:
    for i in range(count):
        run = folder / f"run-{i:03d}"
        run.mkdir(parents=True)
        (run / ".lora-tune-run").write_text("")
        (run / "recipe.yaml").write_text(f"output_dir: {run}\n")
        lines = [
            json.dumps({"step": s, "loss": 3.0 / s, "learning_rate": 1e-4, "grad_norm": 1.0})
            for s in range(1, records + 1)
        ]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (run / "summary.json").write_text(
            json.dumps({"steps": records, "train_loss": 0.5, "eval_loss": 0.6, "wall_seconds": 60})
        )


def page_load(browser, url: str, expected_rows: int) -> float:  # noqa: ANN001 - a playwright Browser
    """From `goto` to the Runs tab showing every run (an empty folder: the table itself)."""
    page = browser.new_page()
    started = time.perf_counter()
    page.goto(url)
    page.locator("[data-testid='tab-runs']").click()
    if expected_rows:
        rows = "[data-testid='runs-table'] tbody tr"
        page.wait_for_function(f"n => document.querySelectorAll({rows!r}).length >= n", arg=expected_rows)
    else:
        page.locator("[data-testid='runs-table'] .q-table__bottom--nodata").wait_for()
    took = time.perf_counter() - started
    page.close()
    return took


def measure_page_load(args: argparse.Namespace, browser, work: Path) -> None:  # noqa: ANN001
    for count in (0, args.runs):
        folder = work / f"runs-{count}"
        folder.mkdir()
        fake_runs(folder, count, args.records)
        child, url = start_ui(work, folder)
        try:
            page_load(browser, url, count)  # the first load warms the server's imports
            times = [page_load(browser, url, count) for _ in range(args.repeat)]
        finally:
            child.terminate()
            child.wait()
        print(
            f"page load, {count:3d} runs in the folder: median {statistics.median(times):.2f} s "
            f"(min {min(times):.2f}, max {max(times):.2f}, {args.repeat} loads)",
            flush=True,
        )


def first_record_seconds(command: list[str], cwd: Path, metrics: Path) -> float:
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            if child.poll() is not None:
                raise SystemExit(f"training ended (exit {child.returncode}) before its first record")
            time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        child.terminate()
        child.wait()


def measure_first_point(browser, work: Path) -> None:  # noqa: ANN001
    sys.path.insert(0, str(ROOT))
    from tests.helpers import tiny_llama_with_real_vocab

    base = tiny_llama_with_real_vocab(work / "base")
    data = ROOT / "recipes" / "data" / "quickstart" / "train.jsonl"
    terminal = work / "terminal.yaml"
    terminal.write_text(RECIPE.format(base=base, data=data, out=work / "terminal-run"))
    seconds = first_record_seconds(
        [sys.executable, "-m", "lora_tune", "train", str(terminal)], work, work / "terminal-run" / "metrics.jsonl"
    )
    print(f"terminal: `lora-tune train` -> first metrics.jsonl record: {seconds:.1f} s", flush=True)

    recipe = work / "ui.yaml"
    recipe.write_text(RECIPE.format(base=base, data=data, out=work / "ui-runs" / "run"))
    child, url = start_ui(work, work / "ui-runs")
    try:
        page = browser.new_page()
        page.set_default_timeout(600_000)
        page.goto(url)
        page.locator("[data-testid='recipe-path']").fill(str(recipe))
        page.locator("[data-testid='load-recipe']").click()
        page.wait_for_function(
            "() => document.querySelector(\"[data-testid='recipe-status']\").innerText.startsWith('ok')"
        )
        page.locator("[data-testid='tab-train']").click()
        started = time.perf_counter()
        page.locator("[data-testid='start']").click()
        page.wait_for_function(
            "() => /loss chart: [1-9]/.test(document.querySelector(\"[data-testid='chart-points']\").innerText)"
        )
        print(f"ui: Start -> first chart point: {time.perf_counter() - started:.1f} s", flush=True)
        page.locator("[data-testid='stop']").click()
        page.wait_for_timeout(2000)
    finally:
        child.terminate()
        child.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="runs in the folder for the page-load figure")
    parser.add_argument("--records", type=int, default=200, help="metrics records per run")
    parser.add_argument("--repeat", type=int, default=3, help="page loads measured per folder")
    parser.add_argument("--skip-training", action="store_true", help="only the page-load figure")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from playwright.sync_api import sync_playwright

    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp, sync_playwright() as playwright:
        work = Path(tmp)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        measure_page_load(args, browser, work)
        if not args.skip_training:
            measure_first_point(browser, work)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
