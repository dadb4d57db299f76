"""llama.cpp's own HF -> GGUF converter, run on a merged folder.

The converter is llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py`), taken from the
llama-cpp-python source distribution on the package registry: the same llama.cpp release as the binding that loads,
quantizes and serves the file, so writer and reader agree on every architecture, tensor layout and tokenizer field.
It is pure Python (no build step) and is fetched once into a cache, hash-checked; nothing of it is copied into
lora-tune. LORA_TUNE_LLAMA_CPP_DIR points at a llama.cpp checkout to use instead.

It runs in a child process: it puts its own `gguf-py` first on sys.path, logs at its own level, and its peak memory
is measured on its own (the merge's is bounded separately).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_tune.export.errors import ExportError
from lora_tune.run.layout import sha256_file

log = logging.getLogger(__name__)

VERSION = "0.3.36"  # llama-cpp-python; scripts/install_llama_cpp.sh installs the same release
SDIST = f"llama-cpp-python=={VERSION}"
SDIST_FILE = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SCRIPT = "convert_hf_to_gguf.py"
MEMBERS = (SCRIPT, "conversion/", "gguf-py/")  # inside vendor/llama.cpp/ of the sdist
SOURCE_ENV = "LORA_TUNE_LLAMA_CPP_DIR"
OUTTYPES = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "f32": "f32"}


@dataclass
class Conversion:
    """What one run of the converter wrote and cost."""

    path: Path
    seconds: float
    peak_rss_mib: float  # the converter process's peak anonymous memory (RssAnon, sampled every 20 ms)


def cache_root() -> Path:
    """Where fetched material lives: $LORA_TUNE_CACHE, else ~/.cache/lora-tune."""
    return Path(os.environ.get("LORA_TUNE_CACHE") or Path.home() / ".cache" / "lora-tune")


def converter_dir() -> Path:
    """A folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/: a checkout named by the environment, else
    the cached copy from the sdist (fetched from the registry the first time, about 77 MB)."""
    given = os.environ.get(SOURCE_ENV)
    if given:
        folder = Path(given)
        if not (folder / SCRIPT).is_file():
            raise ExportError(f"{SOURCE_ENV}={given}: no {SCRIPT} there; point it at a llama.cpp checkout")
        return folder
    folder = cache_root() / f"llama.cpp-{VERSION}"
    if not (folder / SCRIPT).is_file():
        _fetch(folder)
    return folder


def _fetch(folder: Path) -> None:
    log.info("export: fetching llama.cpp's converter (%s, once per machine) into %s", SDIST, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        sdist = Path(tmp) / SDIST_FILE
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps", SDIST]
        done = subprocess.run([*command, "-d", tmp], capture_output=True, text=True)
        if done.returncode != 0 or not sdist.is_file():
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(
                f"could not download {SDIST} for llama.cpp's GGUF converter (is the package registry reachable? "
                f"or set {SOURCE_ENV} to a llama.cpp checkout): {tail}"
            )
        if sha256_file(sdist) != SDIST_SHA256:
            raise ExportError(f"{SDIST_FILE}: sha256 {sha256_file(sdist)}, expected {SDIST_SHA256}; not used")
        build = Path(tmp) / "converter"
        _extract(sdist, build)
        shutil.rmtree(folder, ignore_errors=True)
        build.rename(folder)  # whole or not at all


def _extract(sdist: Path, target: Path) -> None:
    with tarfile.open(sdist, "r:gz") as tar:
        for info in tar:
            parts = info.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<member>
            if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"] or not info.isfile():
                continue
            name = parts[3]
            if not any(name == m or (m.endswith("/") and name.startswith(m)) for m in MEMBERS):
                continue
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(info).read())  # type: ignore[union-attr]
    if not (target / SCRIPT).is_file():
        raise ExportError(f"{SDIST_FILE} has no vendor/llama.cpp/{SCRIPT}")


def convert(model_dir: Path, outfile: Path, outtype: str, model_name: str) -> Conversion:
    """Run the converter on a transformers folder; `outfile` appears only when it succeeded."""
    import time

    folder = converter_dir()
    peak_file = outfile.with_name(outfile.name + ".peak")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder / "gguf-py"), str(folder)])}
    env[PEAK_ENV] = str(peak_file)
    env[PARENT_ENV] = str(os.getpid())
    command = [sys.executable, "-c", _LAUNCHER, str(folder / SCRIPT), str(model_dir), "--outfile", str(outfile)]
    command += ["--outtype", OUTTYPES[outtype], "--model-name", model_name]
    started = time.monotonic()
    returncode, stderr = _run_child(command, env)
    seconds = round(time.monotonic() - started, 1)
    peak_kib = float(peak_file.read_text() or 0) if peak_file.is_file() else 0.0
    peak_file.unlink(missing_ok=True)
    if returncode != 0:
        refused = _storage_refusal(outfile) if outfile.exists() else None
        outfile.unlink(missing_ok=True)
        raise ExportError(explain_failure(stderr, model_dir, outfile, refused))
    return Conversion(outfile, seconds, round(peak_kib / 1024, 1))


def _storage_refusal(outfile: Path) -> OSError | None:
    """The error the storage gives for more of the partial `outfile` (no space, a quota, a size limit), found by
    appending 1 MiB to it before it is removed: numpy reports a tensor's short write only as 'N requested and M
    written', without the reason."""
    try:
        with outfile.open("ab") as f:
            f.write(bytes(PROBE_BYTES))
    except OSError as error:
        return error if error.errno in STORAGE_ERRNOS else None
    return None


def _run_child(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """The converter's exit status and stderr. It runs in a process group of its own, so that an interrupted export
    (Ctrl-C, an exception) kills all of it rather than leave minutes of conversion writing GBs; a killed export
    (SIGKILL, SIGTERM) cannot run code, so the launcher asks the kernel for SIGKILL when its parent dies (strictly,
    when the thread that started it ends: this one, which waits for it)."""
    pipe = subprocess.PIPE
    child = subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, env=env, start_new_session=True)
    try:
        _, stderr = child.communicate()
    except BaseException:
        _kill_group(child)
        raise
    return child.returncode, stderr


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had ended already
        pass
    child.wait()


PEAK_ENV = "LORA_TUNE_PEAK_FILE"
PARENT_ENV = "LORA_TUNE_CONVERTER_PARENT"
# Runs the converter script as __main__ and, when it ends however it ends, writes the process's peak anonymous memory
# (KiB): RssAnon sampled every 20 ms. Not ru_maxrss: the converter memory-maps the safetensors, and the file pages it
# has read count in RSS although the kernel can drop them at any time; the anonymous part is what can run out.
# First (Linux) it asks for SIGKILL when the export that started it dies (prctl PR_SET_PDEATHSIG = 1), and exits if
# that happened already, before the request (its parent is then another process). The peak is not written when the
# disk is full: the converter's own error is the one to report.
_LAUNCHER = f"""
import os, runpy, sys, threading, time
if sys.platform.startswith("linux"):
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() != int(os.environ["{PARENT_ENV}"]):
        sys.exit("the export that started the GGUF converter has ended")
peak = [0]
def sample():
    while True:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
        except OSError:
            return
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
script = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    try:
        with open(os.environ["{PEAK_ENV}"], "w") as f:
            f.write(str(peak[0]))
    except OSError:
        pass
"""


# What the converter prints when it refuses, and the line lora-tune says instead.
_UNKNOWN_PRE = re.compile(r"BPE pre-tokenizer was not recognized|chkhsh")
_UNSUPPORTED = re.compile(r"Model (\w+) is not supported")


# A line of a tqdm progress bar (the converter draws one while it writes), and the last line of a traceback.
_PROGRESS = re.compile(r"\d+%\|.*\||\[\d\d:\d\d")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Interrupt)(?::|$)")
_TRACEBACK = "Traceback (most recent call last):"
_ERRNO = re.compile(r"\[Errno (\d+)\] ([^\n]+)")
_TOTAL_SIZE = re.compile(r"total_size = (\S+)")
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the storage refused the write
PROBE_BYTES = 1 << 20


def explain_failure(stderr: str, model_dir: Path, outfile: Path | None = None, refused: OSError | None = None) -> str:
    """One line for the converter's refusal; the full output goes to the debug log. `refused`: what the storage
    said when more of `outfile` was written after the converter failed."""
    log.debug("convert_hf_to_gguf.py output:\n%s", stderr)
    if _UNKNOWN_PRE.search(stderr):
        return (
            f"{model_dir}: llama.cpp does not know this tokenizer's BPE pre-tokenizer (it recognises them by hashing "
            "their output), so llama.cpp would split text differently from transformers; GGUF export needs a "
            "tokenizer of a model family llama.cpp supports"
        )
    if match := _UNSUPPORTED.search(stderr):
        return f"{model_dir}: llama.cpp {VERSION} cannot convert the architecture {match.group(1)} to GGUF"
    cause = refused.strerror if refused is not None else _storage_cause(stderr)
    if outfile is not None and cause:
        return _storage_full(cause, stderr, outfile)
    return f"llama.cpp's GGUF converter failed on {model_dir}: {_error_line(stderr)} (--debug shows its full output)"


def _error_line(stderr: str) -> str:
    """The converter's own error: the last exception line after the last traceback, else the last line that is not
    a progress bar (tqdm redraws its bar at exit, after the traceback)."""
    tail = stderr.rsplit(_TRACEBACK, 1)[1] if _TRACEBACK in stderr else ""
    exceptions = [line for line in _lines(tail) if _EXCEPTION.match(line)]
    if exceptions:
        return exceptions[-1]
    text = [line for line in _lines(stderr) if not _PROGRESS.search(line)]
    return text[-1] if text else "no output"


def _lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def _storage_cause(stderr: str) -> str | None:
    """'No space left on device' (or a quota, a size limit) when the converter's output says so: closing a file
    whose buffer could not be written raises it with the errno."""
    for match in _ERRNO.finditer(stderr):
        if int(match[1]) in STORAGE_ERRNOS:
            return match[2].strip()
    return None


def _storage_full(cause: str, stderr: str, outfile: Path) -> str:
    """The cause, the file, how large it would be and what is free there now that the partial file is gone."""
    size = _TOTAL_SIZE.findall(stderr)
    needed = f"; the file needs about {size[-1]}B" if size else ""
    try:
        free = f", {shutil.disk_usage(outfile.parent).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = ""
    return f"{cause} writing {outfile} (llama.cpp's GGUF converter{needed}{free})"
