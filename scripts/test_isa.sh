#!/usr/bin/env bash
# Runs the test suite once per torch CPU kernel path (ATEN_CPU_CAPABILITY=default, avx2, and the machine's native
# choice), so a threshold that holds on one path only is found here and not on the next machine.
# Usage: scripts/test_isa.sh [pytest args...]   (make test-isa); prints one summary line per path, exits non-zero
# when any path fails. Logs: runs/test-isa/<path>.log
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
mkdir -p runs/test-isa
if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  echo "CPU: AVX512-BF16 (bitsandbytes' packed 4-bit path is available: its tests run)"
else
  echo "CPU: no AVX512-BF16 (bitsandbytes' packed 4-bit tests skip here; run this on such a CPU too)"
fi
status=0
summary=()
for isa in default avx2 native; do
  log=runs/test-isa/$isa.log
  start=$(date +%s)
  if [ "$isa" = native ]; then
    env -u ATEN_CPU_CAPABILITY "$python" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
  else
    ATEN_CPU_CAPABILITY=$isa "$python" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
  fi
  rc=$?
  [ $rc -eq 0 ] || status=1
  line=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tail -n 1)
  summary+=("$(printf '%-8s rc=%s %4ss  %s' "$isa" "$rc" "$(( $(date +%s) - start ))" "$line")")
  echo "${summary[-1]}"
  [ $rc -eq 0 ] || grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
done
exit $status
