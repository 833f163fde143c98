#!/usr/bin/env bash
# Repeats the GPU engine's concurrency test (`gpu_engine_survives_concurrent_engines`) on the
# GPU machine, from the repo root with `.gpu` carried (scripts/gpu-bundle.sh), to measure how
# often it fails (the SIGSEGV of crates/tritter/README.md "Threads and CUDA graphs"):
#   bash dev/churn_runs.sh [SECONDS]     # default 300; writes $OUT/log.txt when OUT is set
# Each run uses --nocapture, so a panic that precedes a crash is printed; a failed run's last
# 40 lines and exit status (139 = SIGSEGV) are kept. Ends with "N of M passed". At ~4% per
# run, ~75 clean runs rule that rate out at 95%.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
bin=.gpu/tests/tritter.gpu_engine
[[ -x "$bin" ]] || { echo "no $bin: build the bundle with scripts/gpu-bundle.sh" >&2; exit 2; }
budget="${1:-300}"
start=$SECONDS n=0 ok=0
while (( SECONDS - start < budget )); do
  n=$((n + 1))
  out="$(timeout 120 "$bin" gpu_engine_survives_concurrent_engines --nocapture 2>&1)"
  rc=$?
  if [[ $rc -eq 0 ]] && grep -q "test result: ok" <<<"$out"; then
    ok=$((ok + 1))
    (( n == 1 )) && grep -E "under churn" <<<"$out"
  else
    echo "== run $n failed, exit status $rc"
    tail -n 40 <<<"$out"
  fi
done
echo "$ok of $n passed in $((SECONDS - start)) s"
(( ok == n ))
