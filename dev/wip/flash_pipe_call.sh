#!/usr/bin/env bash
# Device script for dev/wip/flash_fwd_pipe.patch; build its inputs with
# dev/wip/build_pipe_probe.sh (what that does, by hand: on a clean tree at the commit the
# patch was made on:
#   1. build the baseline:  cargo bench --features cuda --bench flash_attn --no-run and xz the
#      executable to .gpu/probe/flash_bench_base.xz;
#   2. git apply dev/wip/flash_fwd_pipe.patch; bash dev/flash_tune.sh (cubins into .gpu/tune);
#      cargo bench ... --no-run -> .gpu/probe/flash_bench_pipe.xz; cargo test -p flash-attn-sm120
#      --release --features cuda --test gpu --test gpu_bwd --no-run -> .gpu/probe/flash_gpu_pipe.xz,
#      .gpu/probe/flash_gpu_bwd_pipe.xz;
#   3. run with carry [".gpu/tune", ".gpu/probe"]:  bash dev/wip/flash_pipe_call.sh).
set -u
export TRITTER_REQUIRE_GPU=1
d=$(python3 -c 'import os, nvidia; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' | head -1)
export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== fwd variants (cubins; max|err| against PyTorch's SDPA)"
timeout 90 python3 .gpu/tune/flash_tune.py .gpu/tune/flash_nopipe.cubin .gpu/tune/flash_default.cubin .gpu/tune/flash_pipe_guard.cubin .gpu/tune/flash_ks2.cubin 2>&1 | grep -v Warning
echo "== PyTorch FA2 backward (peer)"
timeout 90 python3 .gpu/tune/flash_bwd_peer.py 2>&1 | grep -v Warning
for f in flash_gpu_pipe flash_gpu_bwd_pipe flash_bench_base flash_bench_pipe flash_bench_bwdq flash_gpu_bwd_bwdq; do xz -dc .gpu/probe/$f.xz > .gpu/probe/$f; chmod +x .gpu/probe/$f; done
for t in flash_gpu_pipe flash_gpu_bwd_pipe flash_gpu_bwd_bwdq; do
  echo "== $t"; timeout 100 .gpu/probe/$t --test-threads=1 2>&1 | grep -E "test result|panicked|FAILED" | head -20
done
for r in 1 2; do for b in pipe base bwdq; do
  echo "== bench $b run $r"
  timeout 100 .gpu/probe/flash_bench_$b --bench zzz_nomatch 2>&1 | grep RESULT | sed 's/ | materialized cuBLAS+softmax.*//; s/ | materialized baseline skipped.*//' | tee "$OUT/bench_${b}_$r.txt"
done; done
