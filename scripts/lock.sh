#!/usr/bin/env bash
# Refreshes requirements.lock: the fully pinned set that `make install` (and so `make test`, `make quickstart` and
# CI) installs. It resolves pyproject.toml's ranges (with the dev extra) to today's newest releases in a fresh
# virtualenv, then freezes it. Run `make test` with the new lock before committing it; `make test-latest` tries the
# newest releases without touching the lock.
# Usage: scripts/lock.sh   (make lock)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch=${TORCH:-torch==2.13.0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --upgrade pip
"$tmp/venv/bin/python" -m pip install --quiet "$torch"   # the CPU build where one lies on disk, as in CI
"$tmp/venv/bin/python" -m pip install --quiet ".[dev]"
{
  echo "# The tested set: \`make install\` installs exactly these (then lora-tune itself with --no-deps)."
  echo "# Made by scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version) on $(uname -m)."
  echo "# torch carries no local build label: the CPU build (CI) and a CUDA build both satisfy it."
  "$tmp/venv/bin/python" -m pip freeze --all --exclude-editable \
    | grep -viE '^(lora-tune|lora_tune) ?[=@]|^(pip|setuptools|wheel)==' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
    | LC_ALL=C sort -f
} >requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages pinned"
