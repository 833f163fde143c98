#!/usr/bin/env bash
# Builds (here) and measures (on the device) dev/wip/flash_bwd_wide_atomic.patch.
#   here:    bash dev/wip/flash_bwd_wide_atomic.sh build     (~3 min warm on 2 cores)
#   device:  bash dev/wip/flash_bwd_wide_atomic.sh run       (carry [".gpu/probe"], ~2 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
  git diff --quiet -- kernels-cuda crates || { echo "commit or stash kernels-cuda/crates changes first" >&2; exit 1; }
  export TRITTER_CUDA_ARCHS=90
  mkdir -p .gpu/probe
  exe() { local t=$1; shift; cargo "$@" --no-run -j2 --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$t"; }
  xz -T2 -c "$(exe flash_attn bench --features cuda --bench flash_attn)" > .gpu/probe/flash_bench_base.xz
  git apply dev/wip/flash_bwd_wide_atomic.patch
  trap 'git checkout -- kernels-cuda' EXIT
  xz -T2 -c "$(exe flash_attn bench --features cuda --bench flash_attn)" > .gpu/probe/flash_bench_wa.xz
  xz -T2 -c "$(exe gpu_bwd test -p flash-attn-sm120 --release --features cuda --test gpu_bwd)" > .gpu/probe/flash_gpu_bwd_wa.xz
  ls -la .gpu/probe ;;
run)
  set +e
  export TRITTER_REQUIRE_GPU=1
  d=$(python3 -c 'import os, nvidia; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' | head -1)
  export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
  exec > >(tee "$OUT/log.txt") 2>&1
  nvidia-smi --query-gpu=name --format=csv,noheader
  for x in .gpu/probe/*.xz; do f=${x%.xz}; xz -dc "$x" > "$f"; chmod +x "$f"; done
  echo "== gpu_bwd"; timeout 90 .gpu/probe/flash_gpu_bwd_wa --test-threads=1 2>&1 | grep -E "test result|panicked|FAILED"
  for r in 1 2; do for b in base wa; do
    echo "== bench $b run $r"
    timeout 80 .gpu/probe/flash_bench_$b --bench zzz_nomatch 2>&1 | grep RESULT | grep -i "bwd\|backward" | sed 's/ | forward.*//'
  done; done ;;
*) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
