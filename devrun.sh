#!/bin/bash
.gpu/run.sh unpack >/dev/null 2>&1
export TRITTER_REQUIRE_GPU=1
d=$(python3 -c 'import os, nvidia; [print(os.path.join(p, "cu13", "lib")) for p in nvidia.__path__]' | head -1)
export LD_LIBRARY_PATH="$d:$LD_LIBRARY_PATH"
exec > >(tee $OUT/log.txt) 2>&1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
cat .gpu/GIT_REV
for b in 2988185 775a043; do xz -d -c .gpu/dev/tritter_$b.xz > /tmp/t_$b && chmod +x /tmp/t_$b; done
echo "=== gpu_engine tests"
timeout 300 .gpu/tests/tritter.gpu_engine --test-threads=1 --nocapture 2>&1 | grep -v "^$" | tail -40
B="bench --preset 7b --device cuda --prompt-len 512 --batch 1,1,32 --decode-steps 64"
echo "=== new"; timeout 150 .gpu/bin/tritter $B | grep -v RESULT
echo "=== 775a043 (device top, v1 kernel)"; timeout 150 /tmp/t_775a043 $B | grep -v RESULT
echo "=== 2988185 (host logits)"; timeout 150 /tmp/t_2988185 $B | grep -v RESULT
echo "=== new again"; timeout 150 .gpu/bin/tritter $B | grep -v RESULT
echo "=== ncu top kernel"
timeout 200 /usr/local/cuda/bin/ncu --clock-control none --kernel-name engine_top_candidates --launch-skip 4 --launch-count 6 --metrics gpu__time_duration.sum --csv .gpu/bin/tritter bench --preset 7b --device cuda --prompt-len 64 --batch 1,32 --decode-steps 4 2>&1 | grep -E '^"ID"|engine_top' | awk -F'","' '{print $8, $9, $NF}'
echo "=== profile batch 32"
timeout 150 .gpu/bin/tritter bench --preset 7b --device cuda --prompt-len 512 --batch 32 --decode-steps 32 --profile | grep -v RESULT
echo "=== done"
