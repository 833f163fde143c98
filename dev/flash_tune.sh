#!/usr/bin/env bash
# Builds flash_fwd.cu tuning variants for sm_90 into .gpu/tune/ (run here, then carry .gpu and
# run `python3 dev/flash_tune.py .gpu/tune/flash_*.cubin` on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
nvcc="$(ls .venv-cuda/lib/python3.*/site-packages/nvidia/cu13/bin/nvcc)"
mkdir -p .gpu/tune
cp dev/flash_tune.py .gpu/tune/
build() { # name flags...
  local name=$1; shift
  "$nvcc" -cubin -arch=sm_90 -O3 "$@" -o ".gpu/tune/flash_$name.cubin" kernels-cuda/kernels/flash_fwd.cu
}
# defaults (D=128: 128-key blocks, 8 warps; D=64: 64 keys, 4 warps), then variants
build default
build ks2 -DFLASH_FWD_KS_UNROLL=2
build ks4 -DFLASH_FWD_KS_UNROLL=4
build bn64_w4 -DFLASH_FWD_BN=64 -DFLASH_FWD_WARPS=4
build bn64_w4_ks2 -DFLASH_FWD_BN=64 -DFLASH_FWD_WARPS=4 -DFLASH_FWD_KS_UNROLL=2
