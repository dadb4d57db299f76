"""The GPU check's CPU dry run (scripts/gpu_check.sh --dry-run) and the parsers only a GPU run reaches.

The dry run exercises every stage's imports, paths, command lines and output parsing, so that the first run on a
GPU machine (scarce device time) does not fail on a typo; the figures a GPU run parses (MFU, measured planner peak,
failing tests) are checked here on synthetic inputs shaped like the real ones.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["install", "preflight", "gpu-tests", "roundtrip", "planner", "bench"]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def run_check(tmp_path: Path, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    """The script as a user calls it. The timeout is above the dry run's own 300 s budget: a slow machine gets the
    script's report (which stage ran long), not a kill."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("GPU_CHECK_DRY_RUN", None)
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp_path)


def test_dry_run_reports_every_stage(tmp_path: Path):
    # An empty wheel folder: the run must not depend on whether this checkout has fetched .whl.
    (tmp_path / "no-wheels").mkdir()
    started = time.monotonic()
    proc = run_check(tmp_path, "--dry-run", "--jobs", "2", "--wheels", str(tmp_path / "no-wheels"))
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["stage"]: r for r in report["rows"]}
    assert report["mode"] == "dry-run" and report["final"] and list(rows) == STAGES
    assert rows["install"]["status"] == "SKIP" and rows["install"]["ok"]  # the packages import here
    for stage in ("preflight", "gpu-tests", "roundtrip", "bench"):  # really ran on the CPU
        assert rows[stage]["status"] == "PASS", rows[stage]
    assert rows["planner"]["status"] == "STUB" and rows["planner"]["figures"].startswith("STUB")

    tests = rows["gpu-tests"]["details"]
    assert tests["tests"] >= 5 and tests["skipped"] == tests["tests"], tests
    assert "tests/e2e/test_gpu.py" in tests["files"]
    trip = rows["roundtrip"]["details"]
    assert trip["train"]["quantized_layers"] > 0
    for merge in ("merge_bf16", "merge_dequantized_bf16"):
        assert trip[merge]["max_abs_diff"] <= trip[merge]["tolerance"], trip
    assert trip["merge_dequantized_bf16"]["dequantized_vs_plain"] > 0
    assert trip["reload"]["new_tokens"] > 0
    plan = rows["planner"]["details"]
    assert plan["argv_ok"] and plan["variants"]["qlora-ckpt-b4-2048"]["planned_allocated_gib"] > 0
    bench = rows["bench"]["details"]["table"]
    assert bench["lora-tune"]["real_tokens_per_s"] > 0 and bench["baseline"]["real_tokens_per_s"] > 0

    table = (tmp_path / "out" / "report.md").read_text()
    assert "DRY RUN on the CPU" in table
    for stage in STAGES:
        assert f"| {stage} |" in table
    assert "| planner | STUB | stub |" in table
    assert "===== bench =====" in (tmp_path / "out" / "gpu-check.log").read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("report: ")
    print(f"dry run: {seconds:.0f}s")


def fake_wheel(folder: Path, name: str) -> Path:
    """A minimal, valid pure-Python wheel that installs one module."""
    path = folder / f"{name}-0.0.1-py3-none-any.whl"
    info = f"{name}-0.0.1.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_install_stage_checks_the_wheel_set_in_a_scratch_folder(tmp_path: Path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "dill")
    proc = run_check(tmp_path, "--dry-run", "--only", "install", "--wheels", str(wheels), timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]  # the set lacks what the image lacks
    row = json.loads((tmp_path / "out" / "report.json").read_text())["rows"][0]
    assert row["stage"] == "install" and row["status"] == "FAIL"
    assert row["details"]["wheels"] == ["dill-0.0.1-py3-none-any.whl"]
    assert {"bitsandbytes", "trl", "pydantic"} <= set(row["details"]["lacking"]) and "dill" not in row["details"]
    assert "site-dry-run" in row["details"]["target"]  # never the real /tmp/site


def test_gpu_run_figures_parse():
    """The parts of the report only a CUDA run produces, fed output shaped like bench_train / validate_plan's."""
    gc = load_gpu_check()
    side = {"real_tokens_per_s": 5000.0, "peak_gib": 20.0, "padding_fraction": 0.0, "mfu": 0.31}
    table = {"lora-tune": side, "baseline": {**side, "real_tokens_per_s": 2000.0, "padding_fraction": 0.3}}
    report = {"device": "cuda", "shape": gc.GPU.bench | {"layers": 32, "hidden": 4096, "max_length": 2048}}
    text = gc.bench_figures({**report, "rows": 64, "table": table})
    assert "32 layers x hidden 4096, max_length 2048" in text and "MFU 31.0%" in text and "speed 2.50x" in text

    variant = "qlora-ckpt-b4-2048"
    good = {variant: {"planned_allocated_gib": 11.0, "planned_total_gib": 12.5, "measured_gib": 10.0}}
    text, ok = gc.plan_figures(good, [variant], measured=True)
    assert ok and "+10.0%" in text
    bad = {variant: {**good[variant], "planned_allocated_gib": 12.0}}
    assert gc.plan_figures(bad, [variant], measured=True)[1] is False
    assert gc.plan_figures({}, [variant], measured=True)[1] is False


def test_junit_counts_name_the_failures(tmp_path: Path):
    gc = load_gpu_check()
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.e2e.test_gpu" name="test_a"/>'
        '<testcase classname="tests.e2e.test_gpu" name="test_b"><failure message="boom"/></testcase>'
        '<testcase classname="tests.e2e.test_plan_gpu" name="test_c"><skipped message="needs 2 GPUs"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts = gc.junit_counts(xml)
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (1, 1, 1)
    assert counts["failed_tests"] == ["tests.e2e.test_gpu::test_b"] and counts["skip_reasons"] == ["needs 2 GPUs"]


@pytest.mark.parametrize("cuda, left, expected", [(False, 400, "no CUDA device"), (True, 100, "out of time")])
def test_later_stages_are_skipped_without_cuda_or_time(tmp_path: Path, cuda: bool, left: int, expected: str):
    gc = load_gpu_check()
    now = time.monotonic()
    ctx = gc.Context(
        dry=False, settings=gc.GPU, out=tmp_path, work=tmp_path, wheels=tmp_path, env={}, deadline=now + left,
        started=now, cuda=cuda,
    )  # fmt: skip
    row = gc.run_stage(ctx, "bench", [])  # the benchmark's floor is 150 s
    assert row.status == "SKIP" and expected in row.figures and not row.ok
