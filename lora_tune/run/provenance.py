"""What a run was started with: command line, package versions, platform, git commit of the recipe's repository.

Written at the start of every attempt (the first one and each resume), so even a run that failed in minute one is
explainable later. Appended as one JSON record per attempt to `environment.jsonl`. Secrets never go in: the command
line is redacted, and no environment variable is recorded except a short list of harmless ones.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_tune.run.layout import RunDir
from lora_tune.run.secrets import redact

PACKAGES = (
    "lora-tune",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
    "safetensors",
)
# Settings that change what runs where; none of them carries a secret.
ENV_VARS = ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "WORLD_SIZE", "LOCAL_RANK")


def environment(recipe_path: str | None, argv: list[str], resumed_from: str | None) -> dict[str, Any]:
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": redact(" ".join(argv)),
        "cwd": os.getcwd(),
        "resumed_from": resumed_from,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "accelerators": _accelerators(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "recipe_git": git_state(Path(recipe_path)) if recipe_path else None,
    }


def record_environment(run: RunDir, record: dict[str, Any]) -> None:
    """Append this attempt's record (a whole line at once, flushed, so a crash cannot leave half of one)."""
    with run.environment.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def git_state(recipe_file: Path) -> dict[str, Any] | None:
    """Commit of the repository holding the recipe file, and whether that file has uncommitted changes."""
    folder = recipe_file.expanduser().resolve().parent
    commit = _git(folder, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(folder, "status", "--porcelain", "--", recipe_file.name)
    remote = _git(folder, "remote", "get-url", "origin") or ""
    # https://user:secret@host/... -> https://host/...: credentials in a remote URL stay out of the run.
    remote = redact(re.sub(r"//[^/@\s]+@", "//", remote))
    return {"commit": commit, "recipe_modified": bool(status), "remote": remote or None}


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _accelerators() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return []
