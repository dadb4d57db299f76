"""The converter child: its failure becomes one line naming the cause (not the progress bar it printed last), and
it never outlives the export that started it (kill -9, SIGTERM or Ctrl-C of the parent).

The process tests run `convert()` in a real parent process on a stand-in converter (LORA_TUNE_LLAMA_CPP_DIR points
at a folder whose convert_hf_to_gguf.py records its pid and sleeps), signal that parent, and check the pids."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_tune.export.gguf_converter import SCRIPT, SOURCE_ENV, explain_failure

ROOT = Path(__file__).resolve().parents[3]

# The converter's stderr when the disk filled while it wrote the tensors (captured from a real run into a 20 MiB
# tmpfs, paths shortened; universal newlines turned tqdm's carriage returns into line breaks). Before the fix the
# launcher's own peak-memory write failed too, and the bar was redrawn last at exit.
DISK_FULL = """\
INFO:gguf.gguf_writer:/x/build/m-F16.gguf: n_tensors = 21, total_size = 33.1M

Writing:   0%|          | 0.00/33.1M [00:00<?, ?byte/s]Traceback (most recent call last):
  File "/c/gguf-py/gguf/gguf_writer.py", line 474, in write_tensors_to_file
    ti.tensor.tofile(fout)
OSError: 8208448 requested and 6573632 written

During handling of the above exception, another exception occurred:

OSError: [Errno 28] No space left on device

Writing:   0%|          | 0.00/33.1M [00:00<?, ?byte/s]
"""


def test_a_full_disk_is_named_with_the_file_not_the_progress_bar(tmp_path: Path) -> None:
    outfile = tmp_path / "m-F16.gguf"
    line = explain_failure(DISK_FULL, Path("/m"), outfile)
    assert line.startswith(f"No space left on device writing {outfile}") and "33.1M" in line
    assert "Writing:" not in line and "\n" not in line


def test_the_last_exception_is_named_not_a_later_progress_fragment() -> None:
    stderr = (
        "Traceback (most recent call last):\n  File x\nValueError: boom\n\nWriting:  50%|#####     | 1/2 [00:01]\n"
    )
    line = explain_failure(stderr.replace("\n\nW", "\rW"), Path("/m"))
    assert line == "llama.cpp's GGUF converter failed on /m: ValueError: boom (--debug shows its full output)"


# ---- the child dies with the export ----------------------------------------------------------------------------

# A stand-in converter: records its pid (and, when asked, a grandchild's), then sleeps as a long conversion would.
FAKE_CONVERTER = """\
import os, subprocess, sys, time
from pathlib import Path
pids = [os.getpid()]
if os.environ.get("FAKE_GRANDCHILD"):
    pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]).pid)
Path(os.environ["FAKE_PIDS"]).write_text(" ".join(map(str, pids)))
time.sleep(60)
"""
PARENT = """\
import sys
from pathlib import Path
from lora_tune.export.gguf_converter import convert
convert(Path(sys.argv[1]), Path(sys.argv[2]), "f16", "x")
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed child stays a zombie until whoever inherited it reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _start_export(tmp_path: Path, grandchild: bool) -> tuple[subprocess.Popen, list[int]]:
    """A parent process inside convert() on the stand-in converter, and the pids the converter started."""
    folder = tmp_path / "llama.cpp"
    folder.mkdir()
    (folder / SCRIPT).write_text(FAKE_CONVERTER)
    pids_file = tmp_path / "pids"
    env = {**os.environ, SOURCE_ENV: str(folder), "FAKE_PIDS": str(pids_file), "PYTHONPATH": str(ROOT)}
    if grandchild:
        env["FAKE_GRANDCHILD"] = "1"
    command = [sys.executable, "-c", PARENT, str(tmp_path), str(tmp_path / "x.gguf")]
    # Ctrl-C as a terminal delivers it: a suite started in the background (`make test &`) runs with SIGINT ignored,
    # and a child inherits that, so the parent's default handler is put back.
    parent = subprocess.Popen(
        command, env=env, stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    deadline = time.monotonic() + 120  # the parent imports lora_tune (torch) first
    while not (pids_file.is_file() and pids_file.read_text().count(" ") == int(grandchild)):
        assert parent.poll() is None and time.monotonic() < deadline, "the stand-in converter did not start"
        time.sleep(0.05)
    return parent, [int(p) for p in pids_file.read_text().split()]


def _gone_within(pids: list[int], seconds: float) -> float | None:
    """Seconds until none of `pids` runs, or None if one still runs after `seconds`."""
    started = time.monotonic()
    while any(_running(p) for p in pids):
        if time.monotonic() - started > seconds:
            return None
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_the_converter_dies_with_a_killed_export(tmp_path: Path, sig: signal.Signals) -> None:
    parent, pids = _start_export(tmp_path, grandchild=False)
    try:
        os.kill(parent.pid, sig)
        parent.wait(timeout=10)
        assert _gone_within(pids, 2.0) is not None, f"the converter (pid {pids[0]}) runs on after {sig.name}"
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_an_interrupted_export_kills_the_converters_whole_process_group(tmp_path: Path) -> None:
    parent, pids = _start_export(tmp_path, grandchild=True)
    try:
        assert os.getpgid(pids[0]) == pids[0]  # its own group: a terminal's Ctrl-C reaches the export alone
        os.kill(parent.pid, signal.SIGINT)  # Ctrl-C: KeyboardInterrupt in the parent
        parent.wait(timeout=10)
        assert _gone_within(pids, 2.0) is not None, f"of the converter's processes {pids}, one runs on"
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
