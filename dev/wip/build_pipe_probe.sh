#!/usr/bin/env bash
# Builds what dev/wip/flash_pipe_call.sh runs: the flash_attn bench of this tree (the base),
# then, with dev/wip/flash_fwd_pipe.patch applied, the bench, the gpu and gpu_bwd tests of
# flash-attn-sm120 and the tuning cubins (dev/flash_tune.sh); the patch is reverted at the end.
# Output: .gpu/probe/flash_{bench_base,bench_pipe,gpu_pipe,gpu_bwd_pipe}.xz and .gpu/tune/.
# Then: run `bash dev/wip/flash_pipe_call.sh` on the device with carry [".gpu/tune", ".gpu/probe"].
set -euo pipefail
cd "$(dirname "$0")/../.."
paths=(kernels-cuda crates dev/flash_tune.py dev/flash_tune.sh)
git diff --quiet -- "${paths[@]}" || { echo "commit or stash the changes under ${paths[*]} first" >&2; exit 1; }
mkdir -p .gpu/probe
# cargo ... --no-run, printing the executable of target $1
exe() {
  local target=$1; shift
  cargo "$@" --no-run -j2 --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$target"
}
xz -T2 -c "$(exe flash_attn bench --features cuda --bench flash_attn)" > .gpu/probe/flash_bench_base.xz
git apply dev/wip/flash_fwd_pipe.patch
trap 'git checkout -- "${paths[@]}"' EXIT
bash dev/flash_tune.sh
xz -T2 -c "$(exe flash_attn bench --features cuda --bench flash_attn)" > .gpu/probe/flash_bench_pipe.xz
for t in gpu gpu_bwd; do
  xz -T2 -c "$(exe $t test -p flash-attn-sm120 --release --features cuda --test $t)" > .gpu/probe/flash_${t}_pipe.xz
done
ls -la .gpu/probe .gpu/tune
