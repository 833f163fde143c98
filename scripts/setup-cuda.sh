#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain into a git-ignored venv, so machines with
# no GPU and no system CUDA can build the kernels (DESIGN.md section 2). Idempotent: a second
# run checks the pins and only prints the nvcc path.
#
#   scripts/setup-cuda.sh            # venv at <repo>/.venv-cuda
#   TRITTER_CUDA_VENV=/opt/cu13 scripts/setup-cuda.sh
#
# Prints the nvcc path on its last line. kernels-cuda/build.rs finds this venv by itself
# (TRITTER_CUDA_VENV, or a .venv-cuda folder above the crate).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TRITTER_CUDA_VENV:-$root/.venv-cuda}"
python="${PYTHON:-python3}"

# nvidia-nvvm must be pinned with the rest, or ptxas rejects the PTX ("Unsupported .version").
pins=(
  "nvidia-cuda-nvcc==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-nvrtc==13.0.*"
  "nvidia-nvvm==13.0.*"
)

find_nvcc() {
  local p
  for p in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    [[ -x "$p" ]] && { echo "$p"; return 0; }
  done
  return 1
}

if nvcc="$(find_nvcc)" && "$nvcc" --version 2>/dev/null | grep -q "release 13.0"; then
  echo "setup-cuda: CUDA 13.0 toolchain already in $venv" >&2
else
  echo "setup-cuda: installing CUDA 13.0 toolchain into $venv" >&2
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
  nvcc="$(find_nvcc)" || { echo "setup-cuda: pip finished but no nvcc under $venv" >&2; exit 1; }
fi

# Smoke test: nvcc needs a host compiler (gcc/g++) even for device-only fatbins.
command -v g++ >/dev/null || command -v c++ >/dev/null || {
  echo "setup-cuda: nvcc needs a C++ host compiler (install g++)" >&2; exit 1; }
"$nvcc" --version | grep release >&2
echo "$nvcc"
