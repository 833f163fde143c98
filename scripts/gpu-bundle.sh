#!/usr/bin/env bash
# Builds every test and bench executable of the workspace in release with feature `cuda`
# and copies the benches and the test executables that hold GPU tests into the git-ignored
# folder .gpu/ together with run.sh, for the GPU machine (which has the NVIDIA driver but
# no Rust). DESIGN.md section 3.
#
#   scripts/gpu-bundle.sh                 # build the bundle (stays under 64 MiB)
#   # on the GPU machine, from the repo root, with .gpu carried:
#   .gpu/run.sh                           # all tests (TRITTER_REQUIRE_GPU=1), then all benches
#   .gpu/run.sh tests                     # tests only
#   .gpu/run.sh benches [criterion args]  # benches only, e.g. `benches act_quant_gpu`
#   .gpu/run.sh unpack                    # only unpack the executables (xz), to run one by hand
#   .gpu/bin/tritter bench --preset 7b --device cuda   # the CLI, after unpack
#
# run.sh writes tests.log, benches.log, summary.txt and resource-usage.txt to $OUT when set
# (else to .gpu/logs) and exits non-zero if any test failed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/.gpu"
limit=$((64 * 1024 * 1024))

"$root/scripts/setup-cuda.sh" >/dev/null

list_executables() { # $1 = test | bench; reads cargo's JSON messages on stdin
  python3 -c '
import json, sys
want = sys.argv[1]
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    kinds = m["target"]["kind"]
    if want == "bench" and kinds != ["bench"]:
        continue
    if want == "test" and not m["profile"]["test"]:
        continue
    # package_id is "path+file:///dir#name@version", or "...#version" when name == dir name
    where, _, tail = m["package_id"].partition("#")
    crate = tail.split("@")[0] if "@" in tail else where.rstrip("/").split("/")[-1]
    print(crate + "." + m["target"]["name"] + "\t" + m["executable"])
' "$1"
}

jobs="${CARGO_BUILD_JOBS:-2}"
echo "gpu-bundle: building tests (release, --features cuda)" >&2
tests="$(cargo test --workspace --release --features cuda --no-run -j "$jobs" --message-format=json-render-diagnostics | list_executables test)"
echo "gpu-bundle: building benches (--features cuda)" >&2
benches="$(cargo bench --workspace --features cuda --no-run -j "$jobs" --message-format=json-render-diagnostics | list_executables bench)"

rm -rf "$bundle"
mkdir -p "$bundle/tests" "$bundle/benches"
copy() { # $1 = dest dir; $2 = only GPU tests (1) or everything (0); stdin = name<TAB>path lines
  while IFS=$'\t' read -r name path; do
    [[ -n "$name" ]] || continue
    # A test binary without a GPU test has nothing to do on the GPU machine (CI runs it):
    # GPU tests go through testing::gpu_for_test (#[inline(never)]), whose symbol the linker
    # keeps only where it is called. (Not a string search: the tritter binaries embed this
    # repository's sources as their built-in corpus.) Keeps the bundle under 64 MiB.
    # (grep -c reads all of nm's output: grep -q would end nm with SIGPIPE under pipefail.)
    if [[ "$2" == 1 ]] && ! nm "$path" 2>/dev/null | grep -c gpu_for_test >/dev/null; then
      continue
    fi
    # <crate folder>.<target>: unique even when two crates have a tests/gpu.rs.
    cp "$path" "$1/$name"
    strip --strip-debug "$1/$name" 2>/dev/null || true
    # Every binary embeds every kernel image (sm_90 + sm_120 + PTX); xz shrinks them ~4x, so
    # the bundle stays under the 64 MiB a device run carries. run.sh unpacks them there.
    xz -T2 -6 -f "$1/$name"
  done
}
copy "$bundle/tests" 1 <<<"$tests"
copy "$bundle/benches" 0 <<<"$benches"
# The CLI (built with cuda by the release test build): `tritter bench` / `generate` on the GPU.
if [[ -x target/release/tritter ]]; then
  mkdir -p "$bundle/bin"
  cp target/release/tritter "$bundle/bin/tritter"
  strip --strip-debug "$bundle/bin/tritter" 2>/dev/null || true
  xz -T2 -6 -f "$bundle/bin/tritter"
fi

ru="$(ls -t target/release/build/tritter-kernels-cuda-*/out/resource-usage.txt 2>/dev/null | head -1 || true)"
[[ -n "$ru" ]] && cp "$ru" "$bundle/resource-usage.txt"
git rev-parse --short=12 HEAD >"$bundle/GIT_REV" 2>/dev/null || echo unknown >"$bundle/GIT_REV"
git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && sed -i 's/$/-dirty/' "$bundle/GIT_REV"

cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundled test binaries with TRITTER_REQUIRE_GPU=1, then the criterion benches.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/logs}"
mkdir -p "$out"
what="${1:-all}"; shift || true
export TRITTER_REQUIRE_GPU=1 CRITERION_HOME="${TMPDIR:-/tmp}/criterion"
# cuBLAS (the benches' peer baseline) is loaded at run time; find it where the CUDA toolkit or
# the nvidia-* pip wheels put it when the loader does not know it already.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  cands="$(python3 -c 'import os, nvidia; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' 2>/dev/null || true)"
  for d in $cands /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    if compgen -G "$d/libcublas.so*" >/dev/null; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; break; fi
  done
fi
# Unpack the xz-compressed executables (gpu-bundle.sh packs them) once, in place.
for z in "$here"/tests/*.xz "$here"/benches/*.xz "$here"/bin/*.xz; do
  [[ -e "$z" ]] || continue
  if command -v xz >/dev/null; then
    xz -d -f "$z"
  else
    python3 -c 'import lzma, sys; open(sys.argv[1][:-3], "wb").write(lzma.open(sys.argv[1]).read())' "$z" && rm -f "$z"
  fi
  chmod +x "${z%.xz}"
done
summary="$out/summary.txt"
echo "bundle $(cat "$here/GIT_REV") on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)" | tee "$summary"
failed=0
if [[ "$what" == all || "$what" == tests ]]; then
  : >"$out/tests.log"
  for t in "$here"/tests/*; do
    name="$(basename "$t")"
    echo "=== test $name" >>"$out/tests.log"
    if "$t" --test-threads=1 --nocapture >>"$out/tests.log" 2>&1; then
      res=ok
    else
      res=FAILED; failed=1
    fi
    line="$(grep -E '^test result:' "$out/tests.log" | tail -1)"
    echo "test $name: $res | $line" | tee -a "$summary"
  done
fi
if [[ "$what" == all || "$what" == benches ]]; then
  : >"$out/benches.log"
  for b in "$here"/benches/*; do
    name="$(basename "$b")"
    echo "=== bench $name" >>"$out/benches.log"
    "$b" --bench "$@" >>"$out/benches.log" 2>&1 || { echo "bench $name: FAILED" | tee -a "$summary"; failed=1; }
  done
  grep -E '^(RESULT|# tritter bench)' "$out/benches.log" | tee -a "$summary"
fi
[[ "$what" == unpack ]] && exit 0
[[ -f "$here/resource-usage.txt" ]] && cp "$here/resource-usage.txt" "$out/"
echo "overall: $([[ $failed == 0 ]] && echo PASS || echo FAIL)" | tee -a "$summary"
exit $failed
RUN
chmod +x "$bundle/run.sh"

size="$(du -sb "$bundle" | cut -f1)"
ls -la "$bundle/tests" "$bundle/benches" >&2
echo "gpu-bundle: $(( size / 1024 / 1024 )) MiB in $bundle" >&2
if (( size > limit )); then
  echo "gpu-bundle: bundle is $size bytes, over the 64 MiB the device run can carry" >&2
  exit 1
fi
