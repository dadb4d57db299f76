"""The memory planner against torch.cuda.max_memory_allocated on a real run (goal: within 15%); needs CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["qlora-ckpt-b2-1024", "qlora-nockpt-b1-1024"])
def test_planned_peak_is_within_15_percent_of_measured(tmp_path: Path, variant: str):
    out = tmp_path / "plan.json"
    args = [
        "--hidden",
        "1024",
        "--layers",
        "8",
        "--vocab",
        "32000",
        "--steps",
        "3",
        "--only",
        variant,
        "--json",
        str(out),
    ]
    subprocess.run([sys.executable, str(ROOT / "scripts/validate_plan.py"), *args], check=True, timeout=900)
    result = json.loads(out.read_text())[variant]
    assert abs(result["planned_allocated_gib"] / result["measured_gib"] - 1) <= 0.15, result
