#!/usr/bin/env python
"""One call checks a CUDA GPU: install the carried wheels, run every GPU test, the 8B benchmark, the planner check
and a QLoRA train -> merge -> verify round trip, then print one table (and write it to a file).

    bash scripts/gpu_check.sh [--dry-run] [--out DIR] [--budget SECONDS] [--only STAGE ...] [--skip STAGE ...]

Stages, in order (each a subprocess in its own process group, killed at its timeout; a failed stage is reported and
the next one runs):

  install    pip-installs .whl/*.whl into /tmp/site (the exact command of ../shared/gpu/fetch-wheels.sh)
  preflight  versions, CUDA, a bitsandbytes NF4 round trip on the device, `python3 -m lora_tune --help`
  gpu-tests  `python3 -m pytest -m gpu` over every test file that carries a gpu mark (junit XML for the counts)
  roundtrip  small random Llama + tokenizer -> QLoRA training -> merge (bf16) and merge --from-dequantized, both
             verified against base + adapter -> the merged folder reloaded with plain transformers and generating
  planner    scripts/validate_plan.py: `lora-tune plan` against torch.cuda.max_memory_allocated (goal: within 15%)
  bench      scripts/bench_train.py --device cuda: Llama-3-8B shape, QLoRA at max_length 2048, lora-tune vs TRL

One more stage runs only when named (`--only long-context`), as its own device call (it takes the whole budget):

  long-context  scripts/gpu_long_context.py: the longest Llama-3-8B QLoRA row that trains a step on a 24 GiB
                allocator cap (bisection around the planner's answer) and the 2 x 2,048 peak against torchtune's
                7.4 GiB, each beside the planner's figure (issue 34)

The whole run keeps inside --budget (default 460 s, under 8 minutes): each stage's timeout is its own cap, cut so
that the stages after it keep their minimum share; a stage that cannot get its minimum is skipped as out of time.
The cheap stages run first so that the long benchmark cannot starve them. The report (report.md, report.json) is
rewritten after every stage, so a run killed from outside still leaves the rows it finished; gpu-check.log holds
every stage's full output. Exit status: 0 when every row passed (or is a dry-run stub), 1 otherwise.

--dry-run (or GPU_CHECK_DRY_RUN=1) runs the same flow on a CPU machine, so that every import, path, command line
and parser is exercised before device time is spent: the install is checked into a scratch folder (when .whl is
there) or skipped (when the packages already import), the GPU tests are collected and skip, the round trip and the
benchmark really run with tiny CPU settings, and the planner stage runs validate_plan.py's own argument parsing and
plans the same variants without measuring (its row says STUB). No dry-run figure is a GPU measurement.

pytest: the GPU image has it (KINDS.md lists pytest, pluggy, iniconfig); where it is missing the gpu-tests row says
FAIL with the wheels to add to fetch-wheels.sh (see PYTEST_WHEELS). pydantic, which lora_tune imports, is not in
that image and not in fetch-wheels.sh's default list: pass the wheels in PYDANTIC_WHEELS to fetch-wheels.sh too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("GPU_CHECK_SITE", "/tmp/site"))  # where the wheels go on the GPU machine
# What the GPU image lacks and the wheels must bring (import names). dill and multiprocess come with datasets.
FROM_WHEELS = ("bitsandbytes", "trl", "datasets", "dill", "multiprocess", "pydantic", "pydantic_core")
# The GPU machine's interpreter and platform tags (those fetch-wheels.sh downloads for).
GPU_PYTHON = "3.12"
GPU_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
# Extra NAME==VERSION arguments for fetch-wheels.sh (versions as in the project's development environment).
PYDANTIC_WHEELS = (
    "pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
)
PYTEST_WHEELS = "pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0"
# (distribution, import name) whose versions the preflight reports and needs.
PACKAGES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("trl", "trl"),
    ("datasets", "datasets"),
    ("bitsandbytes", "bitsandbytes"),
    ("pydantic", "pydantic"),
    ("pyyaml", "yaml"),
    ("safetensors", "safetensors"),
    ("tokenizers", "tokenizers"),
    ("huggingface_hub", "huggingface_hub"),
    ("pyarrow", "pyarrow"),
    ("matplotlib", "matplotlib"),
)
STAGES = ("install", "preflight", "gpu-tests", "roundtrip", "planner", "bench")
EXTRA_STAGES = ("long-context",)  # run only when named with --only
PLAN_GOAL = 0.15  # validate_plan.py's goal: planned allocator peak within 15% of the measured one


@dataclass(frozen=True)
class Settings:
    """Per-mode sizes. GPU: chosen so the whole run fits 8 minutes on one H200 (estimates in docs/gpu-check.md)."""

    budget_s: int
    caps: dict[str, int]  # a stage's own timeout
    floors: dict[str, int]  # the least time worth starting it with (reserved while earlier stages run)
    bench: dict
    plan: dict
    roundtrip: dict
    long_context: dict = field(default_factory=dict)


GPU = Settings(
    budget_s=460,
    caps={
        "install": 120,
        "preflight": 120,
        "gpu-tests": 210,
        "roundtrip": 150,
        "planner": 150,
        "bench": 300,
        "long-context": 540,
    },
    floors={
        "install": 20,
        "preflight": 30,
        "gpu-tests": 60,
        "roundtrip": 45,
        "planner": 45,
        "bench": 150,
        "long-context": 300,
    },
    # 64 chats of ~650 tokens: ~42k real tokens per side, one run per side (bench_train's default 512 x 2 runs
    # would take ~10 minutes, mostly training); the 16 GB model is built once and loaded once per side.
    bench={"device": "cuda", "rows": 64, "repeats": 1},
    # validate_plan.py's default model (hidden 2048, 16 layers, 128k vocab: ~1.5B parameters) at the benchmark's
    # batch 4 x 2048 tokens; the GPU tests already run two smaller variants (tests/e2e/test_plan_gpu.py).
    plan={"hidden": 2048, "layers": 16, "vocab": 128256, "steps": 3, "variants": ["qlora-ckpt-b4-2048"]},
    roundtrip={
        "hidden": 512,
        "layers": 4,
        "heads": 8,
        "rows": 64,
        "steps": 20,
        "max_length": 128,
        "dtype": "bfloat16",
    },
    # Building and saving the 16 GB model, three QLoRA loads and the 2 x 2,048 steps: about 200 s (estimated; the
    # first run's log has the figure); the bisection gets the rest of the stage's time.
    long_context={"gib": 24, "setup_s": 200},
)
DRY = Settings(
    budget_s=300,
    caps=dict.fromkeys(STAGES + EXTRA_STAGES, 150),
    floors=dict.fromkeys(STAGES + EXTRA_STAGES, 5),
    bench={"device": "cpu", "rows": 8, "repeats": 1},
    plan={"hidden": 2048, "layers": 16, "vocab": 128256, "steps": 3, "variants": ["qlora-ckpt-b4-2048"]},
    roundtrip={"hidden": 64, "layers": 2, "heads": 4, "rows": 16, "steps": 3, "max_length": 64, "dtype": "float32"},
    long_context={"gib": 24, "setup_s": 60},
)


@dataclass
class Row:
    """One line of the table. `status`: PASS, FAIL, SKIP or STUB (a dry-run stand-in, never a measurement)."""

    stage: str
    status: str
    ran_as: str
    seconds: float
    figures: str
    details: dict = field(default_factory=dict)
    excerpt: str = ""  # the end of the stage's output when it failed

    @property
    def ok(self) -> bool:
        return self.status in ("PASS", "STUB") or (self.status == "SKIP" and self.details.get("harmless", False))


@dataclass
class Context:
    dry: bool
    settings: Settings
    out: Path
    work: Path
    wheels: Path
    env: dict[str, str]
    deadline: float
    started: float
    site_installed: bool = False
    cuda: bool | None = None  # from the preflight; None until known
    rows: list[Row] = field(default_factory=list)
    live: set[subprocess.Popen] = field(default_factory=set)  # running commands, killed on an interrupt

    @property
    def mode(self) -> str:
        return "cpu (dry run)" if self.dry else "gpu"


# ---------------------------------------------------------------------------------------------------------------
# Running commands


def log_path(ctx: Context, stage: str) -> Path:
    return ctx.work / "logs" / f"{stage}.log"


def run_logged(ctx: Context, stage: str, cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """Run `cmd` from the repo root with its output appended to the stage's log; returns (exit code or None when
    it timed out, the output it wrote). Its own session, so the timeout kills the whole group: the benchmark and
    validate_plan.py start their own children, which would otherwise outlive it holding the GPU."""
    log = log_path(ctx, stage)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}   (timeout {timeout:.0f}s)\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=ctx.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        ctx.live.add(proc)
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill_group(proc)  # at the timeout, and also whatever it left behind (dataloader workers...)
            ctx.live.discard(proc)
        if code is None:
            out.write(f"\n[gpu-check] killed after {timeout:.0f}s\n".encode())
    with log.open("rb") as f:
        f.seek(start)
        return code, f.read().decode(errors="replace")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL what is left after a few seconds."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            try:  # the leader is gone; children may still be there
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


def result_of(output: str) -> dict | None:
    """The last `RESULT {json}` line a child printed (the convention of bench_train.py and validate_plan.py)."""
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if lines else None


def tail(text: str, lines: int = 25) -> str:
    """The end of a failed stage's output, without progress-bar redraws or RESULT lines (the row has those)."""
    kept = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines() if ln.strip() and not ln.startswith("RESULT ")]
    return "\n".join(kept[-lines:])


def child(ctx: Context, stage: str, name: str, timeout: float, *args: str) -> tuple[int | None, str, dict | None]:
    """Run one of this script's own child modes (below) and return its RESULT."""
    code, output = run_logged(ctx, stage, [sys.executable, __file__, "--child", name, *args], timeout)
    return code, output, result_of(output)


def failed(ctx: Context, stage: str, code: int | None, output: str, what: str, seconds: float = 0.0) -> Row:
    reason = f"timed out ({what})" if code is None else f"{what} (exit {code})"
    return Row(stage, "FAIL", ctx.mode, seconds, reason, {"exit": code}, tail(output))


# ---------------------------------------------------------------------------------------------------------------
# Stages: each returns a Row (its time is filled in by the caller).


def stage_install(ctx: Context, timeout: float) -> Row:
    wheels = sorted(ctx.wheels.glob("*.whl")) if ctx.wheels.is_dir() else []
    missing = [m for m in FROM_WHEELS if importlib.util.find_spec(m) is None]
    if not wheels:
        if not missing:
            note = f"no wheels in {ctx.wheels}; the packages import here (nothing to install)"
            return Row("install", "SKIP", ctx.mode, 0, note, {"harmless": True})
        note = f"no wheels in {ctx.wheels} and {', '.join(missing)} missing: run ../shared/gpu/fetch-wheels.sh "
        note += f"{PYDANTIC_WHEELS} and carry .whl"
        return Row("install", "FAIL", ctx.mode, 0, note, {"missing": missing})
    # The dry run installs into a scratch folder, which it never puts on the path: that checks the set (one version
    # of each, all installable together) and what it brings, without shadowing this machine's packages.
    target = ctx.work / "site-dry-run" if ctx.dry else SITE
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
    cmd += ["--upgrade", "--target", str(target)]
    if ctx.dry:  # judge the wheels for the GPU machine's Python and platform, whatever this machine runs
        cmd += ["--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp"]
        cmd += [arg for tag in GPU_PLATFORMS for arg in ("--platform", tag)]
    cmd += map(str, wheels)
    code, output = run_logged(ctx, "install", cmd, timeout)
    if code != 0:
        return failed(ctx, "install", code, output, "pip install from the wheels failed")
    brought = {p.name.split("-")[0].split(".")[0] for p in target.iterdir()}
    # The dry run judges the set against the GPU image (which has none of FROM_WHEELS); the real run against what
    # this machine lacks.
    lacking = [m for m in FROM_WHEELS if m not in brought and (ctx.dry or m in missing)]
    if not ctx.dry:
        ctx.site_installed = True
        ctx.env["PYTHONPATH"] = os.pathsep.join([str(SITE), ctx.env["PYTHONPATH"]])
    figures = f"{len(wheels)} wheels -> {target}"
    if lacking:
        figures += f"; the wheels lack {', '.join(lacking)} (the GPU image has none of them: fetch those too)"
    details = {"wheels": [p.name for p in wheels], "target": str(target), "lacking": lacking}
    return Row("install", "FAIL" if lacking else "PASS", ctx.mode, 0, figures, details)


def stage_preflight(ctx: Context, timeout: float) -> Row:
    code, output, info = child(ctx, "preflight", "preflight", timeout)
    if info is None:
        return failed(ctx, "preflight", code, output, "the preflight child printed no RESULT")
    ctx.cuda = bool(info.get("cuda"))
    problems = list(info["problems"])
    if not ctx.dry and not ctx.cuda:
        problems.append("torch sees no CUDA device (on a CPU machine use --dry-run)")
    versions = info["versions"]
    device = info.get("device_name") or "CPU"
    if info.get("device_gib"):
        device += f" ({info['device_gib']:.0f} GiB, CUDA {info.get('cuda_version')})"
    figures = f"{device}; python {info['python']}; " + ", ".join(
        f"{name} {versions[name]}"
        for name in ("torch", "transformers", "peft", "trl", "bitsandbytes")
        if name in versions
    )
    if info.get("nf4_relative_error") is not None:
        figures += f"; NF4 round trip on {info['nf4_device']}: relative error {info['nf4_relative_error']:.3f}"
    if problems:
        figures += "; PROBLEMS: " + "; ".join(problems)
    return Row(
        "preflight", "FAIL" if problems else "PASS", ctx.mode, 0, figures, info, tail(output) if problems else ""
    )


def gpu_test_files() -> list[str]:
    """Every test file with a gpu mark, found afresh so that new GPU tests are run too; collecting only these keeps
    pytest's collection short."""
    pattern = re.compile(r"mark\.gpu\b")
    files = [p for p in sorted((ROOT / "tests").rglob("test_*.py")) if pattern.search(p.read_text(encoding="utf-8"))]
    return [str(p.relative_to(ROOT)) for p in files]


def junit_counts(path: Path) -> dict:
    """Counts and failing test names from pytest's junit XML (sturdier than reading its summary line)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    skips = {s.get("message", "") for case in root.iter("testcase") for s in case.findall("skipped")}
    counts["skip_reasons"] = sorted(skips)
    return counts


def stage_gpu_tests(ctx: Context, timeout: float) -> Row:
    files = gpu_test_files()
    if not files:
        return Row("gpu-tests", "FAIL", ctx.mode, 0, "no test file carries a gpu mark (grep mark.gpu tests)")
    probe = [sys.executable, "-c", "import pytest; print('pytest', pytest.__version__)"]
    code, output = run_logged(ctx, "gpu-tests", probe, min(timeout, 60))
    if code != 0:
        note = f"pytest does not import here: fetch its wheels too: ../shared/gpu/fetch-wheels.sh {PYTEST_WHEELS}"
        return Row("gpu-tests", "FAIL", ctx.mode, 0, note, {"exit": code}, tail(output))
    junit = ctx.work / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={junit}", *files]
    code, output = run_logged(ctx, "gpu-tests", cmd, timeout)
    if code is None or not junit.is_file():
        return failed(ctx, "gpu-tests", code, output, "pytest wrote no junit report")
    counts = junit_counts(junit)
    counts["files"] = files
    figures = (
        f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failures']} failed, "
        f"{counts['errors']} errors (of {counts['tests']} gpu tests in {len(files)} files)"
    )
    if counts["failed_tests"]:
        figures += "; failing: " + ", ".join(counts["failed_tests"][:6])
    bad = code != 0 or counts["failures"] or counts["errors"] or counts["tests"] == 0
    if ctx.dry:
        # Without CUDA every one skips (conftest.py): the run proves collection, imports and the command line.
        bad = bad or counts["passed"] != 0
        figures += " -- collected and skipped without CUDA, as expected"
    elif counts["passed"] == 0:
        bad = True
        figures += " -- none ran: is CUDA visible to pytest?"
    return Row("gpu-tests", "FAIL" if bad else "PASS", ctx.mode, 0, figures, counts, tail(output) if bad else "")


def stage_roundtrip(ctx: Context, timeout: float) -> Row:
    work = ctx.work / "roundtrip"
    code, output, res = child(ctx, "roundtrip", "roundtrip", timeout, str(work), json.dumps(ctx.settings.roundtrip))
    if res is None:
        return failed(ctx, "roundtrip", code, output, "the round trip printed no RESULT")
    parts = []
    train = res.get("train", {})
    if "error" in train:
        parts.append(f"train FAILED: {train['error']}")
    elif train:
        peak = f", GPU peak {train['gpu_peak_gib']:.2f} GiB" if train.get("gpu_peak_gib") else ""
        loss = f"{train['train_loss']:.3f}" if train.get("train_loss") is not None else "none"
        parts.append(
            f"QLoRA on {res['device']} ({res['dtype']}): {train['steps']} steps, loss {loss}, "
            f"{train['quantized_layers']} NF4 layers{peak}, {train['seconds']:.0f}s"
        )
    for key, label in (("merge_bf16", "merge bf16"), ("merge_dequantized_bf16", "merge --from-dequantized bf16")):
        m = res.get(key, {})
        if "error" in m:
            parts.append(f"{label} FAILED: {m['error']}")
        elif m:
            text = f"{label}: max abs logit diff {m['max_abs_diff']:.3g} (tolerance {m['tolerance']:.3g})"
            if m.get("dequantized_vs_plain") is not None:
                text += f", {m['dequantized_vs_plain']:.3g} from the plain merge's function"
            parts.append(text)
    reload = res.get("reload", {})
    if "error" in reload:
        parts.append(f"reload FAILED: {reload['error']}")
    elif reload:
        parts.append(f"merged folder reloaded on {reload['device']}, generated {reload['new_tokens']} tokens")
    bad = code != 0 or not res.get("ok")
    return Row("roundtrip", "FAIL" if bad else "PASS", ctx.mode, 0, "; ".join(parts), res, tail(output) if bad else "")


def plan_args(ctx: Context, out: Path) -> list[str]:
    p = ctx.settings.plan
    args = ["--hidden", str(p["hidden"]), "--layers", str(p["layers"]), "--vocab", str(p["vocab"])]
    args += ["--steps", str(p["steps"]), "--json", str(out)]
    for variant in p["variants"]:
        args += ["--only", variant]
    return args


def plan_figures(results: dict, variants: list[str], measured: bool) -> tuple[str, bool]:
    """One text for the table from validate_plan.py's JSON ({variant: {planned_allocated_gib, measured_gib...}})."""
    parts, ok = [], True
    for name in variants:
        r = results.get(name)
        if r is None:
            parts.append(f"{name}: no result (see the log)")
            ok = False
        elif not measured:
            parts.append(f"{name}: planned {r['planned_allocated_gib']:.2f} GiB (allocator), not measured")
        else:
            error = r["planned_allocated_gib"] / r["measured_gib"] - 1
            ok = ok and abs(error) <= PLAN_GOAL
            parts.append(
                f"{name}: planned {r['planned_allocated_gib']:.2f} GiB vs measured max_memory_allocated "
                f"{r['measured_gib']:.2f} GiB ({error:+.1%}; goal within {PLAN_GOAL:.0%})"
            )
    return "; ".join(parts), ok


def stage_planner(ctx: Context, timeout: float) -> Row:
    out = ctx.work / "plan.json"
    variants = ctx.settings.plan["variants"]
    if ctx.dry:
        code, output, res = child(ctx, "planner", "plan-stub", timeout, json.dumps(plan_args(ctx, out)))
        if res is None:
            return failed(ctx, "planner", code, output, "the planner stub printed no RESULT")
        figures, ok = plan_figures(res["variants"], variants, measured=False)
        figures = "STUB (no CUDA): validate_plan.py accepted the command line; " + figures
        ok = ok and code == 0 and res["argv_ok"]
        return Row("planner", "STUB" if ok else "FAIL", "stub", 0, figures, res, "" if ok else tail(output))
    cmd = [sys.executable, "scripts/validate_plan.py", *plan_args(ctx, out)]
    code, output = run_logged(ctx, "planner", cmd, timeout)
    if code != 0 or not out.is_file():
        return failed(ctx, "planner", code, output, "validate_plan.py wrote no results")
    results = json.loads(out.read_text())
    figures, ok = plan_figures(results, variants, measured=True)
    return Row("planner", "PASS" if ok else "FAIL", ctx.mode, 0, figures, results, "" if ok else tail(output))


def bench_figures(report: dict) -> str:
    """lora-tune vs baseline from bench_train.py's --json output."""
    table = report["table"]
    a, b = table["lora-tune"], table["baseline"]

    def side(name: str, r: dict) -> str:
        mfu = f", MFU {r['mfu']:.1%}" if "mfu" in r else ""
        return f"{name} {r['real_tokens_per_s']:,.0f} real tokens/s, peak {r['peak_gib']:.2f} GiB{mfu}"

    speed = a["real_tokens_per_s"] / b["real_tokens_per_s"]
    memory = a["peak_gib"] / b["peak_gib"]
    shape = report["shape"]
    return (
        f"{shape['layers']} layers x hidden {shape['hidden']}, max_length {shape['max_length']}, "
        f"{report['rows']} chats: "
        f"{side('lora-tune', a)}; {side('TRL baseline', b)}; speed {speed:.2f}x, peak memory {memory:.2f}x, "
        f"padding {a['padding_fraction']:.1%} vs {b['padding_fraction']:.1%}"
    )


def stage_bench(ctx: Context, timeout: float) -> Row:
    b = ctx.settings.bench
    out = ctx.work / "bench.json"
    cmd = [sys.executable, "scripts/bench_train.py", "--device", b["device"], "--rows", str(b["rows"])]
    cmd += ["--repeats", str(b["repeats"]), "--json", str(out)]
    code, output = run_logged(ctx, "bench", cmd, timeout)
    if code != 0 or not out.is_file():
        return failed(ctx, "bench", code, output, "bench_train.py wrote no results")
    report = json.loads(out.read_text())
    figures = bench_figures(report)
    ran_as = ctx.mode
    if ctx.dry:
        ran_as += ": bench_train's CPU model, not the 8B shape"
    return Row("bench", "PASS", ran_as, 0, figures, report)


def long_context_figures(report: dict) -> str:
    """The long-context stage's row from gpu_long_context.py's RESULT."""
    parts = []
    for name, r in report["two_by_2048"].items():
        m, p = r["measured"], r["planned"]
        peak = f"{m['allocated_gib']:.2f} GiB allocated" if "allocated_gib" in m else "no CUDA figure"
        fits = "" if m["fits"] else " (OOM)"
        parts.append(f"2 x 2,048 {name}: {peak}{fits}, planned {p['allocated_gib']:.2f}")
    top = report["longest"]
    state = "" if top["converged"] else f", search stopped below {top['first_failing']:,}"
    parts.append(
        f"longest row on {report['gib']:g} GiB: {top['longest']:,} tokens{state} (planner {top['planned']:,}); "
        f"torchtune 7.4 GiB, unsloth 78,475 tokens"
    )
    return "; ".join(parts)


def stage_long_context(ctx: Context, timeout: float) -> Row:
    s = ctx.settings.long_context
    out = ctx.work / "long-context.json"
    search = max(30, int(timeout - s["setup_s"]))
    cmd = [sys.executable, "scripts/gpu_long_context.py", "--gib", str(s["gib"]), "--search-budget", str(search)]
    cmd += ["--json", str(out), *(["--dry-run"] if ctx.dry else [])]
    code, output = run_logged(ctx, "long-context", cmd, timeout)
    if code != 0 or not out.is_file():
        return failed(ctx, "long-context", code, output, "gpu_long_context.py wrote no results")
    report = json.loads(out.read_text())
    figures = long_context_figures(report)
    if ctx.dry:
        return Row("long-context", "STUB", "stub", 0, "STUB (CPU, tiny model, pretend limit): " + figures, report)
    return Row("long-context", "PASS", ctx.mode, 0, figures, report)


STAGE_FUNCS: dict[str, Callable[[Context, float], Row]] = {
    "install": stage_install,
    "preflight": stage_preflight,
    "gpu-tests": stage_gpu_tests,
    "roundtrip": stage_roundtrip,
    "planner": stage_planner,
    "bench": stage_bench,
    "long-context": stage_long_context,
}


# ---------------------------------------------------------------------------------------------------------------
# Child modes: run in a fresh interpreter with the children's PYTHONPATH, print `RESULT {json}`.


def child_preflight() -> int:
    """Versions, the device, lora_tune from this tree and its command line; then the NF4 round trip, last, since a
    native library that crashes the process must not take the other findings with it (RESULT is printed before)."""
    import importlib
    import platform

    info: dict = {"python": platform.python_version(), "versions": {}, "problems": []}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            props = torch.cuda.get_device_properties(0)
            info.update(device_name=props.name, device_gib=props.total_memory / 2**30, cuda_version=torch.version.cuda)
            info["device_count"] = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001 - every finding is reported, not just the first
        info["problems"].append(f"torch: {type(exc).__name__}: {exc}")
    for dist, module in PACKAGES:
        try:
            info["versions"][dist] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            info["problems"].append(f"import {module}: {type(exc).__name__}: {exc}")
    if any(p.startswith(tuple(f"import {m}" for m in FROM_WHEELS)) for p in info["problems"]):
        info["problems"].append(f"fetch the missing wheels: ../shared/gpu/fetch-wheels.sh {PYDANTIC_WHEELS}")
    try:
        import lora_tune
        import lora_tune.export
        import lora_tune.plan.memory
        import lora_tune.tasks.sft.training  # noqa: F401 - the import is the check

        info["lora_tune"] = lora_tune.__file__
        if not Path(lora_tune.__file__).resolve().is_relative_to(ROOT):
            info["problems"].append(f"lora_tune is imported from {lora_tune.__file__}, not from {ROOT}")
    except Exception as exc:  # noqa: BLE001
        info["problems"].append(f"import lora_tune: {type(exc).__name__}: {exc}")
    # The console script is not installed on the GPU machine: `python3 -m lora_tune` is what users call there.
    cli = subprocess.run([sys.executable, "-m", "lora_tune", "--help"], capture_output=True, text=True, timeout=120)
    if cli.returncode != 0:
        info["problems"].append(f"python3 -m lora_tune --help: exit {cli.returncode}: {tail(cli.stderr, 3)}")
    info["problems"].append("the NF4 round trip did not finish (crashed?)")
    print("RESULT " + json.dumps(info), flush=True)
    info["problems"].pop()
    try:
        info["nf4_device"] = "cuda" if info.get("cuda") else "cpu"
        info["nf4_relative_error"] = nf4_round_trip(bool(info.get("cuda")))
        if not info["nf4_relative_error"] < 0.2:  # NF4 of a Gaussian matrix: about 0.09; NaN fails too
            info["problems"].append(f"NF4 round trip error {info['nf4_relative_error']:.3f}, expected about 0.09")
    except Exception as exc:  # noqa: BLE001
        info["problems"].append(f"bitsandbytes NF4 round trip: {type(exc).__name__}: {exc}")
    print("RESULT " + json.dumps(info), flush=True)
    return 0


def nf4_round_trip(cuda: bool) -> float:
    """Quantize and dequantize a matrix with bitsandbytes' NF4 on the device: loads its native library there."""
    import bitsandbytes.functional as bnbf
    import torch

    dtype = torch.bfloat16 if cuda else torch.float32
    weight = torch.randn(256, 256, device="cuda" if cuda else "cpu", dtype=dtype)
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4")
    back = bnbf.dequantize_4bit(packed, state)
    return float((back.float() - weight.float()).norm() / weight.float().norm())


ROUNDTRIP_RECIPE = """\
model: {{name: {model}, dtype: {dtype}}}
quantization: {{bits: 4}}
adapter: {{r: 8, alpha: 16, dropout: 0.0}}
datasets: [{{path: {data}}}]
training: {{max_steps: {steps}, batch_size: 4, max_length: {max_length}, learning_rate: 2.0e-3, warmup_steps: 0,
  logging_steps: 1, save_strategy: "no", eval_strategy: "no", gradient_checkpointing: false}}
preflight: {{on_failure: warn}}
output_dir: {out}
"""
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "pear", "plum"]


def build_roundtrip_assets(work: Path, s: dict) -> tuple[Path, Path]:
    """A random Llama sized by `s` with a locally trained tokenizer, and an instruction set (index -> fruit)."""
    from lora_tune.quickstart.tiny import build_tiny_llama, build_tokenizer

    corpus = [f"fruit number {i}? {f}. name the fruit: {', '.join(FRUITS)}" for i, f in enumerate(FRUITS)] * 20
    tokenizer = build_tokenizer(corpus, vocab_size=320)
    model = build_tiny_llama(tokenizer, hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"])
    model_dir = work / "base"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = [
        {"instruction": "Name the fruit.", "input": f"fruit number {i % 9}?", "output": FRUITS[i % 9]}
        for i in range(s["rows"])
    ]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return model_dir, data


def child_roundtrip(work: Path, s: dict) -> int:
    """Train QLoRA, merge twice with verification, reload the merged folder and generate; every step reports its
    figures or its error, so one RESULT says how far the round trip got."""
    import torch

    from lora_tune import train
    from lora_tune.export import merge
    from lora_tune.recipe.load import load_recipe

    cuda = torch.cuda.is_available()
    res: dict = {"device": "cuda" if cuda else "cpu", "dtype": s["dtype"], "ok": False}
    work.mkdir(parents=True, exist_ok=True)
    try:
        model_dir, data = build_roundtrip_assets(work, s)
        recipe = work / "recipe.yaml"
        recipe.write_text(ROUNDTRIP_RECIPE.format(model=model_dir, data=data, out=work / "run", **s))
        run = train(load_recipe(recipe), overwrite=True)
        res["train"] = {
            "steps": run.steps,
            "train_loss": run.train_loss,
            "quantized_layers": run.quantized_layers,
            "gpu_peak_gib": run.memory.get("gpu_peak_gib"),
            "seconds": run.wall_seconds,
        }
    except Exception as exc:  # noqa: BLE001
        res["train"] = {"error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(res), flush=True)
        raise
    ok = run.steps == s["steps"] and run.quantized_layers > 0 and math.isfinite(run.train_loss or math.nan)
    ok = ok and (not cuda or bool(run.memory.get("gpu_peak_gib")))  # it really trained on the GPU
    for key, extra in (("merge_bf16", {}), ("merge_dequantized_bf16", {"from_dequantized": True})):
        try:
            m = merge(run.run_dir, work / key, dtype="bf16", **extra)
            res[key] = {
                k: getattr(m, k) for k in ("max_abs_diff", "tolerance", "dequantized_vs_plain", "lora_modules")
            }
            ok = ok and m.max_abs_diff is not None and m.lora_modules > 0
        except Exception as exc:  # noqa: BLE001 - a VerificationError carries the figures in its message
            res[key] = {"error": f"{type(exc).__name__}: {exc}"}
            ok = False
    try:
        res["reload"] = reload_and_generate(work / "merge_bf16", cuda)
    except Exception as exc:  # noqa: BLE001
        res["reload"] = {"error": f"{type(exc).__name__}: {exc}"}
        ok = False
    res["ok"] = ok
    print("RESULT " + json.dumps(res), flush=True)
    return 0 if ok else 1


def reload_and_generate(folder: Path, cuda: bool) -> dict:
    """What a user does with a merged folder: plain from_pretrained on the device, then generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if cuda else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    ids = tokenizer("fruit number 3?", return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return {"device": device, "new_tokens": int(out.shape[1] - ids.shape[1])}


def child_plan_stub(argv: list[str]) -> int:
    """The planner stage without a GPU: validate_plan.py's own main() parses the same arguments (it then stops at
    its CUDA check, returning 2), and `lora_tune.plan.memory` plans each variant's recipe on a config of the same
    shape."""
    spec = importlib.util.spec_from_file_location("validate_plan", ROOT / "scripts" / "validate_plan.py")
    assert spec and spec.loader
    vp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vp)
    res: dict = {"argv": argv, "variants": {}}
    try:
        res["argv_ok"] = vp.main(argv) == 2  # its "needs a CUDA GPU" return, not argparse's SystemExit(2)
    except SystemExit as exc:
        res["argv_ok"], res["argv_error"] = False, f"argparse rejected the command line (exit {exc.code})"
    from lora_tune.plan.memory import GIB, plan
    from lora_tune.recipe.load import load_recipe

    args = dict(zip(argv[::2], argv[1::2], strict=False))
    hidden, layers, vocab = int(args["--hidden"]), int(args["--layers"]), int(args["--vocab"])
    root = Path(tempfile.mkdtemp(prefix="plan-stub-"))
    vp.model_config(hidden, layers, vocab).save_pretrained(root / "model")  # the planner reads no weights
    data = root / "data.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
    )
    variants = [v for flag, v in zip(argv[::2], argv[1::2], strict=False) if flag == "--only"]
    for name in variants:
        recipe = root / f"{name}.yaml"
        recipe.write_text(vp.RECIPE.format(model=root / "model", data=data, steps=args["--steps"], out=root / name))
        planned = plan(load_recipe(recipe, vp.VARIANTS[name]), gpu_memory="1000GiB")
        res["variants"][name] = {
            "planned_allocated_gib": planned.allocated / GIB,
            "planned_total_gib": planned.total / GIB,
            "measured_gib": None,
        }
    shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Orchestration and report


def stamp(ctx: Context) -> str:
    elapsed = int(time.monotonic() - ctx.started)
    return f"[gpu-check {elapsed // 60:02d}:{elapsed % 60:02d}]"


def stage_timeout(ctx: Context, stage: str, later: list[str]) -> float:
    """The stage's cap, cut so that every stage after it keeps its floor inside the budget."""
    reserve = sum(ctx.settings.floors[s] for s in later)
    return min(ctx.settings.caps[stage], ctx.deadline - time.monotonic() - reserve)


def run_stage(ctx: Context, stage: str, later: list[str]) -> Row:
    timeout = stage_timeout(ctx, stage, later)
    if timeout < ctx.settings.floors[stage]:
        return Row(stage, "SKIP", ctx.mode, 0, f"out of time: {max(0, timeout):.0f}s left for it within the budget")
    if stage not in ("install", "preflight") and ctx.cuda is False and not ctx.dry:
        return Row(stage, "SKIP", ctx.mode, 0, "no CUDA device (see preflight); on a CPU machine use --dry-run")
    print(f"{stamp(ctx)} {stage}: start (timeout {timeout:.0f}s)", flush=True)
    started = time.monotonic()
    try:
        row = STAGE_FUNCS[stage](ctx, timeout)
    except Exception as exc:  # noqa: BLE001 - a bug in one stage's parsing must not lose the other rows
        row = Row(stage, "FAIL", ctx.mode, 0, f"gpu_check.py error: {type(exc).__name__}: {exc}")
        log = log_path(ctx, stage)
        row.excerpt = tail(log.read_text(errors="replace")) if log.exists() else ""
    row.seconds = round(time.monotonic() - started, 1)
    print(f"{stamp(ctx)} {stage}: {row.status} in {row.seconds:.0f}s -- {row.figures}", flush=True)
    return row


def markdown(ctx: Context, final: bool) -> str:
    wall = time.monotonic() - ctx.started
    head = "DRY RUN on the CPU: no figure below is a GPU measurement" if ctx.dry else "GPU check"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    state = "" if final else " (in progress: the rows so far)"
    lines = [
        f"# lora-tune {head}{state}",
        "",
        f"{when}; wall {wall:.0f}s of a {ctx.settings.budget_s}s budget; settings: bench {ctx.settings.bench}, "
        f"planner {ctx.settings.plan}, round trip {ctx.settings.roundtrip}",
        "",
        "| stage | result | ran as | time | figures |",
        "|---|---|---|---|---|",
    ]
    for r in ctx.rows:
        lines.append(f"| {r.stage} | {r.status} | {r.ran_as} | {r.seconds:.0f}s | {r.figures.replace('|', '/')} |")
    for r in ctx.rows:
        if r.excerpt:
            lines += ["", f"## {r.stage}: end of its output", "", "```", r.excerpt, "```"]
    return "\n".join(lines) + "\n"


def run_all(ctx: Context, chosen: list[str], jobs: int) -> None:
    """The stages in order; or (dry run, jobs > 1) several at a time, the benchmark first as the longest: in a dry
    run no stage depends on another's result, and the CI test then takes about half the time."""
    if jobs <= 1:
        for i, stage in enumerate(chosen):
            ctx.rows.append(run_stage(ctx, stage, chosen[i + 1 :]))
            write_report(ctx, final=False)
        return
    longest_first = sorted(chosen, key=lambda s: s != "bench")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_stage, ctx, stage, []) for stage in longest_first]
        for future in as_completed(futures):
            ctx.rows.append(future.result())
            ctx.rows.sort(key=lambda r: (STAGES + EXTRA_STAGES).index(r.stage))
            write_report(ctx, final=False)


def write_report(ctx: Context, final: bool) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "report.md").write_text(markdown(ctx, final), encoding="utf-8")
    report = {
        "mode": "dry-run" if ctx.dry else "gpu",
        "final": final,
        "wall_s": round(time.monotonic() - ctx.started, 1),
        "budget_s": ctx.settings.budget_s,
        "settings": asdict(ctx.settings),
        "rows": [{**asdict(r), "ok": r.ok} for r in ctx.rows],
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    logs = [log_path(ctx, s) for s in STAGES + EXTRA_STAGES if log_path(ctx, s).exists()]
    # One log file: the device tool brings back at most 8 files.
    with (ctx.out / "gpu-check.log").open("w", encoding="utf-8") as out:
        for log in logs:
            out.write(f"\n===== {log.stem} =====\n{log.read_text(errors='replace')}")


def child_env(dry: bool) -> dict[str, str]:
    """Offline, and the repo on the path: on the GPU machine lora_tune is imported from the tree, not installed."""
    env = dict(os.environ)
    paths = [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    if dry:  # a stale /tmp/site from an earlier experiment must not shadow this machine's packages
        paths = [p for p in paths if Path(p) != SITE]
    env.update(PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return env


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check", help="report folder")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels to install (default .whl)")
    parser.add_argument("--budget", type=int, default=None, help="seconds for the whole run (default 460; dry 300)")
    parser.add_argument(
        "--only", action="append", choices=STAGES + EXTRA_STAGES, help="run only these stages (long-context: only so)"
    )
    parser.add_argument("--skip", action="append", choices=STAGES, default=[], help="leave these stages out")
    parser.add_argument("--bench-rows", type=int, default=None, help="chats per benchmark side (GPU default 64)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (models, runs)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="dry run only: stages at a time (the GPU run is sequential: clean timings)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(args: list[str]) -> int:
    name, rest = args[0], args[1:]
    if name == "preflight":
        return child_preflight()
    if name == "roundtrip":
        return child_roundtrip(Path(rest[0]), json.loads(rest[1]))
    if name == "plan-stub":
        return child_plan_stub(json.loads(rest[0]))
    raise SystemExit(f"unknown child {name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args.child)
    if args.jobs > 1 and not args.dry_run:
        raise SystemExit("--jobs: only with --dry-run (GPU stages run one at a time, so their timings are clean)")
    base = DRY if args.dry_run else GPU
    settings = Settings(
        budget_s=args.budget or base.budget_s,
        caps=base.caps,
        floors=base.floors,
        bench={**base.bench, **({"rows": args.bench_rows} if args.bench_rows else {})},
        plan=base.plan,
        roundtrip=base.roundtrip,
        long_context=base.long_context,
    )
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ctx = Context(
        dry=args.dry_run,
        settings=settings,
        out=args.out.resolve(),
        work=work,
        wheels=args.wheels.resolve(),
        env=child_env(args.dry_run),
        deadline=started + settings.budget_s,
        started=started,
    )
    ctx.env["HF_HOME"] = str(work / "hf-home")  # no stale datasets cache, nothing written under ~
    chosen = [s for s in STAGES + EXTRA_STAGES if (s in (args.only or STAGES)) and s not in args.skip]
    print(f"{stamp(ctx)} {'DRY RUN (CPU) ' if ctx.dry else ''}stages {', '.join(chosen)}; report -> {ctx.out}")
    try:
        run_all(ctx, chosen, args.jobs)
    except KeyboardInterrupt:
        print(f"{stamp(ctx)} interrupted", flush=True)
        for proc in list(ctx.live):
            kill_group(proc)
    finally:
        write_report(ctx, final=True)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    for row in ctx.rows:
        if row.excerpt:
            print(f"\n----- {row.stage}: end of its output -----\n{row.excerpt}")
    print("\n" + markdown(ctx, final=True))
    print(f"report: {ctx.out / 'report.md'} (and report.json, gpu-check.log beside it)")
    return 0 if all(r.ok for r in ctx.rows) and ctx.rows else 1


if __name__ == "__main__":
    sys.exit(main())
