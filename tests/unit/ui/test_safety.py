"""What the page guards: the bind address, the password, a live run, the one-line errors."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_tune.errors import LoraTuneError
from lora_tune.run.layout import LOCK, MARKER
from lora_tune.run.locks import LockedError, acquire, release
from lora_tune.ui.app import PasswordGate, ansi_to_html, check_bind
from lora_tune.ui.jobs import Trainings, one_line_error


def test_beyond_loopback_only_with_a_password() -> None:
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "secret")
    with pytest.raises(LoraTuneError, match="--auth or LORA_TUNE_UI_PASSWORD"):
        check_bind("0.0.0.0", None)


def test_the_command_refuses_an_open_bind_in_one_line_before_serving() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LORA_TUNE_UI_PASSWORD"}
    proc = subprocess.run(
        [sys.executable, "-m", "lora_tune", "ui", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --host 0.0.0.0:") and "Traceback" not in proc.stderr


def call(gate: PasswordGate, kind: str, header: bytes | None) -> list[dict]:
    sent: list[dict] = []
    reached: list[str] = []

    async def inner(scope, receive, send) -> None:  # noqa: ANN001
        reached.append(scope["type"])

    async def send(message: dict) -> None:
        sent.append(message)

    gate.app = inner
    headers = [(b"authorization", header)] if header else []
    asyncio.run(gate(dict(type=kind, headers=headers), None, send))
    return reached or sent


def test_the_password_gate() -> None:
    gate = PasswordGate(None, "s3cret")
    good = b"Basic " + base64.b64encode(b"anyone:s3cret")
    bad = b"Basic " + base64.b64encode(b"anyone:guess")
    assert call(gate, "http", good) == ["http"]
    assert call(gate, "websocket", good) == ["websocket"]
    refused = call(gate, "http", bad)
    assert refused[0]["status"] == 401 and b"s3cret" not in refused[1]["body"]
    assert call(gate, "http", None)[0]["status"] == 401
    assert call(gate, "websocket", None) == [{"type": "websocket.close", "code": 1008}]
    assert call(gate, "http", b"Basic !!notbase64")[0]["status"] == 401


def test_a_live_run_is_refused_and_its_log_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / MARKER).write_text("")
    trainings = Trainings(tmp_path / "runs", tmp_path)
    log = trainings.log_path(Path("runs/r"))
    log.parent.mkdir(parents=True)
    log.write_text("the live run's log\n")
    lock = acquire(run / LOCK, "output_dir", run)
    try:
        with pytest.raises(LockedError, match="is in use by another lora-tune process"):
            trainings.start(tmp_path / "recipe.yaml", Path("runs/r"))
    finally:
        release(lock)
    assert log.read_text() == "the live run's log\n"
    assert trainings.stop(Path("runs/r")) is None  # nothing live to stop


def test_the_error_line_of_a_command() -> None:
    assert one_line_error("loading\nerror: recipe.yaml:3: x: bad\n") == "error: recipe.yaml:3: x: bad"
    assert one_line_error("[rank 1/2] error: boom\n") == "[rank 1/2] error: boom"
    assert one_line_error("a\nlast words\n") == "last words"
    assert one_line_error("") == "the command failed without a message"


def test_trained_tokens_are_marked_in_the_preview() -> None:
    text = "User: hi <\x1b[1;32mAnswer.\x1b[0m> done"
    assert ansi_to_html(text) == (
        'User: hi &lt;<span class="trained" style="background:#c8f7c5">Answer.</span>&gt; done'
    )


def test_help_imports_neither_the_page_nor_torch() -> None:
    code = (
        "import sys\nfrom lora_tune.cli import main\n"
        "try:\n    main(['ui', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('nicegui', 'torch', 'lora_tune.ui.app') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--runs DIR" in proc.stdout and "HEAVY []" in proc.stdout


def test_a_failed_start_shows_the_commands_line_and_keeps_the_earlier_log(tmp_path: Path) -> None:
    trainings = Trainings(tmp_path / "runs", tmp_path)
    log = trainings.log_path(Path("runs/r"))
    log.parent.mkdir(parents=True)
    log.write_text("an earlier attempt\n")
    child = trainings.start(Path("missing.yaml"), Path("runs/r"))
    assert child.wait(timeout=120) == 2 and trainings.exit_code(Path("runs/r")) == 2
    tail = trainings.tail(Path("runs/r"))
    assert tail.startswith("an earlier attempt\n$ lora-tune train missing.yaml")
    assert one_line_error(tail) == "error: missing.yaml: recipe file not found"
