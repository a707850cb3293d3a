#!/usr/bin/env bash
# The Gluon GEMV on a GPU machine, second round: its CUDA tests, Nsight Compute stall reasons for some configs
# at M = 16 (28672x8192), then benchmarks/kernels.py at M = 1..16 on the Llama shapes without
# and with the Gluon configs offered to the tuner (fresh tuning caches, same run); into OUTDIR.
#   bash benchmarks/device_gluon3.sh OUTDIR "IDX ..."     (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_gluon3.sh OUTDIR [CONFIG INDICES]}
PROF=${2:-"7 10 15"}
source "$(dirname "$0")/device_env.sh"
EXA_GEMV_GLUON=1 EXA_CACHE_DIR=$(mktemp -d) timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf \
  --tb=short tests/test_gemv_gluon.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
for i in $PROF; do
  timeout 60 /usr/local/cuda/bin/ncu --kernel-name regex:_int4_gemv_gluon --launch-skip 3 --launch-count 1 \
    --metrics "regex:smsp__warp_issue_stalled_.*_per_warp_active.pct,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed" \
    python3 benchmarks/profile_gemv.py --shape 28672x8192 --m 16 --gluon "$i" > "$OUT/ncu-stall-$i.txt" 2>&1
  echo "== config $i"; grep -E "stalled|duration|warps_active|inst_executed|dram__" "$OUT/ncu-stall-$i.txt" \
    | awk '$NF+0 >= 2 || /duration|warps_active|inst_exec|dram/' | sed 's/smsp__warp_issue_stalled_//; s/_per_warp_active.pct//' | head -16
done
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
for on in 0 1; do
  EXA_GEMV_GLUON=$on EXA_CACHE_DIR=$(mktemp -d) timeout 240 python3 benchmarks/kernels.py --no-bnb --m 1,2,4,8,16 \
    --shapes $SHAPES --out "$OUT/kernels-gluon$on.json" > "$OUT/kernels-gluon$on.txt" 2>&1
  grep -E "exa-int4" "$OUT/kernels-gluon$on.txt" | cut -c1-80; tail -1 "$OUT/kernels-gluon$on.txt"
done
