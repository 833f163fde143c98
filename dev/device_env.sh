# Sourced by the dev/ scripts that run on the GPU machine from the repo root with `.gpu`
# carried (scripts/gpu-bundle.sh): unpacks the bundle's executables, makes GPU tests fail
# instead of skipping, puts the CUDA 13 runtime libraries of the machine's pip `nvidia`
# packages on LD_LIBRARY_PATH, and copies all output to $OUT/log.txt when OUT is set.
.gpu/run.sh unpack >/dev/null 2>&1
export TRITTER_REQUIRE_GPU=1
libs="$(python3 -c 'import os, nvidia; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null | head -1)"
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -n "${OUT:-}" ]] && exec > >(tee "$OUT/log.txt") 2>&1
