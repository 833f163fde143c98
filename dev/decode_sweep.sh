#!/usr/bin/env bash
# Decode-step sweep of the tritter engine's launch knobs, run on the GPU machine from the
# repo root with `.gpu` carried (build it here first with scripts/gpu-bundle.sh):
#   bash dev/decode_sweep.sh            # writes $OUT/log.txt when OUT is set
# Each line is one `tritter bench` run (7B preset, random weights, 512-token prompt, 64
# decode steps): the default, then every knob in SWEEP (space-separated VAR=value, run
# in this order), then the default again to bound the run-to-run spread. Knobs:
#   TRITTER_GEMV_MIN_KSPLIT=n  at least n K splits per GEMV (ternary-gemm plan)
#   TRITTER_KV_SPLITS=n        splits of the INT4 decode attention (kv-int4 split plan)
#   TRITTER_PDL=0              every launch plain;  TRITTER_PDL_SMALL=0  engine kernels plain
# BATCH (default 1) picks the batch; PROFILE=1 adds a `--profile` run (graphs off, CUDA
# events per phase).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"
sweep=(${SWEEP:-TRITTER_GEMV_MIN_KSPLIT=2 TRITTER_GEMV_MIN_KSPLIT=4 TRITTER_KV_SPLITS=3 TRITTER_KV_SPLITS=8 TRITTER_KV_SPLITS=16})
batch="${BATCH:-1}"
echo "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), bundle $(cat .gpu/GIT_REV), batch $batch"
bench() { # $1 = label, rest = environment
  local label="$1"; shift
  local line
  line="$(env "$@" timeout 90 .gpu/bin/tritter bench --preset 7b --device cuda --batch "$batch" \
    --prompt-len 512 --decode-steps 64 2>&1 | grep -E '^RESULT' | tail -1)"
  printf '%-28s %s\n' "$label" "$(sed -E 's/.*decode_step_ms=([0-9.]+) decode_tok_s=([0-9.]+).*/\1 ms  \2 tokens\/s/' <<<"$line")"
}
bench default X=1
for kv in "${sweep[@]}"; do bench "$kv" "$kv"; done
bench default X=1
if [[ "${PROFILE:-0}" == 1 ]]; then
  timeout 90 .gpu/bin/tritter bench --preset 7b --device cuda --batch "$batch" --prompt-len 512 \
    --decode-steps 32 --profile 2>&1 | tail -25
fi
