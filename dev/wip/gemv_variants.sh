#!/usr/bin/env bash
# Builds (here) and measures (on the device) dev/wip/gemv_variants.patch: two gate/up GEMV
# variants for the fused MLP at M = 1 (32-row CTAs with one block per batch, 60 / 48
# registers, 4-5 CTAs per SM; plain launches measured 13.02 against 13.69 us for `_r4` at
# 27648 x 4096 in an earlier session, never chained with PDL) and the M = 2..8 `_r2` kernel
# with activations a batch ahead (122 registers, still 2 CTAs per SM). Selected at run time:
# TRITTER_GEMV_GLU_VARIANT=r2u1|r2u1_pb, TRITTER_GEMV_R2_PB=1 (one binary).
#   here:    bash dev/wip/gemv_variants.sh build     (~3 min warm on 2 cores)
#   device:  bash dev/wip/gemv_variants.sh run       (carry [".gpu/probe"], ~4 min)
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
  git diff --quiet -- kernels-cuda crates || { echo "commit or stash kernels-cuda/crates changes first" >&2; exit 1; }
  export TRITTER_CUDA_ARCHS=90
  rm -rf .gpu/probe && mkdir -p .gpu/probe
  exe() { local t=$1; shift; cargo "$@" --no-run -j2 --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$t"; }
  git apply dev/wip/gemv_variants.patch
  trap 'git checkout -- kernels-cuda crates' EXIT
  xz -T2 -c "$(exe ternary_gemm bench --features cuda --bench ternary_gemm)" > .gpu/probe/tgemm_bench.xz
  xz -T2 -c "$(exe ternary test -p ternary-gemm --release --features cuda --test ternary)" > .gpu/probe/tgemm_test.xz
  cargo build --release -p tritter --features cuda --bin tritter -j2
  xz -T2 -c target/release/tritter > .gpu/probe/tritter.xz
  ls -la .gpu/probe ;;
run)
  set +eu
  source dev/device_env.sh  # (its bundle unpack is a no-op without .gpu/run.sh)
  P=.gpu/probe
  nvidia-smi --query-gpu=name --format=csv,noheader
  for x in $P/*.xz; do f=${x%.xz}; xz -dc "$x" > "$f"; chmod +x "$f"; done
  for v in "X=1" "TRITTER_GEMV_GLU_VARIANT=r2u1 TRITTER_GEMV_R2_PB=1" "TRITTER_GEMV_GLU_VARIANT=r2u1_pb"; do
    echo "== conformance $v"; env $v timeout 150 $P/tgemm_test 2>&1 | grep -E "test result|panicked|FAILED" | tail -4
  done
  for r in 1 2; do for v in "X=1" "TRITTER_GEMV_GLU_VARIANT=r2u1" "TRITTER_GEMV_GLU_VARIANT=r2u1_pb"; do
    echo "== decode $v run $r"
    env $v timeout 100 $P/tritter bench --preset 7b --device cuda --batch 1 --prompt-len 512 --decode-steps 64 2>&1 | grep -E '^RESULT' | tail -1
  done; done
  for v in "X=1" "TRITTER_GEMV_GLU_VARIANT=r2u1 TRITTER_GEMV_R2_PB=1" "TRITTER_GEMV_GLU_VARIANT=r2u1_pb"; do
    echo "== tgemm $v"; env $v timeout 200 $P/tgemm_bench --bench zzz_nomatch 2>&1 | grep -E "RESULT ternary_(mlp|gemv_graph M=8 )"
  done ;;
*) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
