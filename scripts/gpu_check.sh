#!/usr/bin/env bash
# One call checks a CUDA GPU (issue 17): installs the wheels carried in .whl/ into /tmp/site, then runs every
# GPU-marked test, the 8B-shaped QLoRA benchmark at 2,048 tokens against the plain TRL baseline, the planner's check
# against torch.cuda.max_memory_allocated and a QLoRA train -> merge -> verify round trip; prints one table and
# writes it to runs/gpu-check/report.md (report.json and gpu-check.log beside it), within 460 s by default.
# `--only long-context` (a separate call, issue 34): the longest 8B QLoRA row that trains on a 24 GiB cap, by
# bisection, and the 2 x 2,048 peak against torchtune's 7.4 GiB (docs/gpu-check.md).
#
#   bash scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--only STAGE] [--skip STAGE] [--keep-work]
#   bash scripts/gpu_check.sh --dry-run        # on a CPU machine: same flow, CUDA parts stubbed, tiny settings
#
# Run from anywhere; python3 (or $PYTHON) must be the interpreter that holds torch. The orchestration, the stages
# and their settings are in scripts/gpu_check.py; how to run it through the device tool is in docs/gpu-check.md.
#
# Wheels: the GPU image lacks bitsandbytes, trl, datasets and pydantic (which lora_tune imports). Fetch them here,
# where the registry is reachable, before the device call:
#   ../shared/gpu/fetch-wheels.sh pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0
# and carry .whl. pytest, pluggy and iniconfig are in the GPU image; where pytest is missing the gpu-tests row says
# so: add `pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0` to the fetch. lora_tune is not installed
# there: it is imported from this tree (the script puts the repo root on PYTHONPATH; `python3 -m lora_tune` is the
# command line there, not `lora-tune`).
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
