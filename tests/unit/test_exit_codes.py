"""The README's exit-code table, read from the README and checked code by code through the command line."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.helpers import model_folder

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "model:\n  name: some/model\ndatasets:\n  - path: {data}\noutput_dir: {out}\n"


def table_codes() -> set[int]:
    """Every code in the first column of README's "Errors and exit codes" table ("130 / 143" is two)."""
    section = (ROOT / "README.md").read_text().split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| ([\d /]+) \|", section, flags=re.M)
    return {int(code) for cell in cells for code in cell.split("/")}


def in_subprocess(code: str, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **kwargs,
    )


def test_the_table_lists_the_codes_tested_here():
    assert table_codes() == {0, 1, 2, 130, 141, 143}


def test_0_success(tmp_path: Path, alpaca_file: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=alpaca_file, out=tmp_path / "run"))
    assert main(["validate", str(recipe)]) == 0


def test_2_a_wrong_recipe_data_or_output_directory(tmp_path: Path, alpaca_file: Path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(data=alpaca_file, out=tmp_path / "run") + "training:\n  learing_rate: 1\n")
    assert main(["validate", str(recipe)]) == 2
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "mine.txt").write_text("x")
    recipe.write_text(RECIPE.format(data=alpaca_file, out=tmp_path / "not-a-run"))
    assert main(["train", str(recipe), "--overwrite"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


def test_1_a_hub_that_cannot_be_reached(online, tmp_path: Path, capsys):
    point_at, _ = online
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # connection refused
    point_at(url)
    assert main(["push", str(model_folder(tmp_path)), "me/x"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # the retries' log lines, then one error line
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_130_and_143_a_signal_stops_training_with_a_checkpoint(signum: int):
    """The mechanism `train` uses (graceful_stop around the loop, raise_if_stopped after it) under the CLI's runner;
    tests/e2e/test_resume.py sends a real SIGTERM to a real training process and resumes it."""
    done = in_subprocess(
        f"""
        import argparse, os, sys, time
        from lora_tune.cli import run_verb
        from lora_tune.training.signals import StopRequest, graceful_stop, raise_if_stopped

        def handler(args):
            stop = StopRequest()
            with graceful_stop(stop):
                os.kill(os.getpid(), {int(signum)})
                time.sleep(0.5)
            raise_if_stopped(stop, 3, "runs/x/checkpoints", "lora-tune train r.yaml --resume")
            return 0

        sys.exit(run_verb(handler, argparse.Namespace()))
        """
    )
    assert done.returncode == 128 + signum, done.stderr
    assert "Resume with: lora-tune train r.yaml --resume" in done.stderr


def test_141_the_reader_went_away():
    process = subprocess.Popen(
        [sys.executable, "-m", "lora_tune.cli", "recipes", "gemma/gemma-2-2b-it-lora-chat"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()
    assert process.wait(timeout=60) == 141 and process.stderr.read() == b""
