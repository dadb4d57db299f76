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

import logging
import os
import re
import shutil
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
    command = [sys.executable, "-c", _LAUNCHER, str(folder / SCRIPT), str(model_dir), "--outfile", str(outfile)]
    command += ["--outtype", OUTTYPES[outtype], "--model-name", model_name]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = round(time.monotonic() - started, 1)
    peak_kib = float(peak_file.read_text() or 0) if peak_file.is_file() else 0.0
    peak_file.unlink(missing_ok=True)
    if done.returncode != 0:
        outfile.unlink(missing_ok=True)
        raise ExportError(explain_failure(done.stderr, model_dir))
    return Conversion(outfile, seconds, round(peak_kib / 1024, 1))


PEAK_ENV = "LORA_TUNE_PEAK_FILE"
# Runs the converter script as __main__ and, when it ends however it ends, writes the process's peak anonymous memory
# (KiB): RssAnon sampled every 20 ms. Not ru_maxrss: the converter memory-maps the safetensors, and the file pages it
# has read count in RSS although the kernel can drop them at any time; the anonymous part is what can run out.
_LAUNCHER = f"""
import os, runpy, sys, threading, time
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
    with open(os.environ["{PEAK_ENV}"], "w") as f:
        f.write(str(peak[0]))
"""


# What the converter prints when it refuses, and the line lora-tune says instead.
_UNKNOWN_PRE = re.compile(r"BPE pre-tokenizer was not recognized|chkhsh")
_UNSUPPORTED = re.compile(r"Model (\w+) is not supported")


def explain_failure(stderr: str, model_dir: Path) -> str:
    """One line for the converter's refusal; the full output goes to the debug log."""
    log.debug("convert_hf_to_gguf.py output:\n%s", stderr)
    if _UNKNOWN_PRE.search(stderr):
        return (
            f"{model_dir}: llama.cpp does not know this tokenizer's BPE pre-tokenizer (it recognises them by hashing "
            "their output), so llama.cpp would split text differently from transformers; GGUF export needs a "
            "tokenizer of a model family llama.cpp supports"
        )
    if match := _UNSUPPORTED.search(stderr):
        return f"{model_dir}: llama.cpp {VERSION} cannot convert the architecture {match.group(1)} to GGUF"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"llama.cpp's GGUF converter failed on {model_dir}: {last} (--debug shows its full output)"
