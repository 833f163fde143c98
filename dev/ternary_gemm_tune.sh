#!/usr/bin/env bash
# Builds tile-configuration variants of kernels-cuda/kernels/ternary_gemm.cu into
# .gpu/tune/*.cubin (sm_90) for dev/ternary_gemm_tune.py, which times them on the GPU
# machine against each other and cuBLAS bf16 (torch), checking every variant's output
# bit for bit against the shipped `gemm_w2a8`. Usage, here then there:
#   dev/ternary_gemm_tune.sh && cp dev/ternary_gemm_tune.py .gpu/tune/
#   python3 .gpu/tune/ternary_gemm_tune.py .gpu/tune          # on the GPU machine
# Variant names: BN_BM_WN_WM_STAGES_QPS_MINB (see GemmTile in the kernel).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="$(ls "$root"/.venv-cuda/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc | head -1)"
out="$root/.gpu/tune"
mkdir -p "$out"
variants=(${TUNE_VARIANTS:-128_128_2_4_4_1_1 128_128_2_4_2_2_1 256_128_4_2_3_1_1 128_256_2_4_2_1_1 256_128_4_4_3_1_1 128_128_2_2_4_1_1 128_128_4_2_4_1_1 128_128_2_4_3_1_2})
for v in "${variants[@]}"; do
  IFS=_ read -r bn bm wn wm st qps minb <<<"$v"
  "$nvcc" -gencode arch=compute_90,code=sm_90 -O3 -cubin -DTRITTER_GEMM_TUNE \
    -DTUNE_BN="$bn" -DTUNE_BM="$bm" -DTUNE_WN="$wn" -DTUNE_WM="$wm" -DTUNE_STAGES="$st" \
    -DTUNE_QPS="$qps" -DTUNE_MINB="$minb" --resource-usage \
    -o "$out/gemm_$v.cubin" "$root/kernels-cuda/kernels/ternary_gemm.cu" 2>&1 |
    grep -A2 "gemm_w2a8_tune" | grep -Eo "Used [0-9]+ registers|[0-9]+ bytes spill stores" | tr '\n' ' ' |
    sed "s/^/$v: /"; echo
done
cp "$root/dev/ternary_gemm_tune.py" "$out/"
