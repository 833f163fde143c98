#!/usr/bin/env bash
# One device call for the dev/wip patches, applied in order (README there):
# here: for p in glu_a8_tail l2_prefetch decode_probes; do git apply dev/wip/$p.patch; done
# && scripts/gpu-bundle.sh (then drop .gpu/tests and
# .gpu/benches entries not used below if the carry is over 64 MiB). On the device, from the
# repository root: bash dev/wip/next_call.sh   (writes $OUT/log.txt)
set -u
.gpu/run.sh unpack >/dev/null 2>&1
export TRITTER_REQUIRE_GPU=1
d=$(python3 -c 'import os, nvidia; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' | head -1)
export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .gpu/GIT_REV
echo "== correctness"
timeout 200 .gpu/tests/ternary-gemm.ternary --test-threads=1 --nocapture mlp_gpu 2>&1 | grep -E "^test |test result|panicked|mismatches [1-9]"
timeout 100 .gpu/tests/kv-int4.gpu --test-threads=1 2>&1 | grep -E "^test |test result|panicked"
for r in 1 2 3; do timeout 100 .gpu/tests/tritter.gpu_engine --nocapture > "$OUT/engine$r.txt" 2>&1; echo "gpu_engine run $r rc=$? $(grep -c ' ok$' "$OUT/engine$r.txt") ok"; done
echo "== MLP and GEMV rows (fused A8 on / off)"
tb() { TRITTER_DEV_FAST=1 timeout 120 .gpu/benches/tritter-suite.ternary_gemm --bench zzz_nomatch 2>&1 | grep -E "RESULT ternary_(gemv_graph M=1|mlp)" | sed 's/ | cuBLAS streaming.*//'; }
tb; TRITTER_DEV_NO_FUSED_A8=1 tb
echo "== 7B batch-1 decode step (ms)"
dec() { timeout 60 .gpu/bin/tritter bench --preset 7b --device cuda --batch 1 --prompt-len 512 --decode-steps 64 2>&1 | grep "^RESULT" | sed 's/.*decode_step_ms=\([0-9.]*\).*/\1/'; }
for r in 1 2; do
  echo "base (no fused A8) $(TRITTER_DEV_NO_FUSED_A8=1 dec) | fused $(dec) | fused + L2 prefetch $(TRITTER_L2_PREFETCH=1 dec)"
done
for s in norm a8o store att; do echo "skip $s: $(TRITTER_DEV_SKIP=$s dec)"; done
for v in gemv_w2a8_u8:16 gemv_w2a8_u6:16 gemv_w2a8_r2u4:32; do echo "GEMV1 $v: $(TRITTER_DEV_GEMV1=$v dec)"; done
for v in gemv_w2a8_glu_r4u2:64 gemv_w2a8_glu_r2u4:32; do echo "GLU $v: $(TRITTER_DEV_GLU=$v dec)"; done
