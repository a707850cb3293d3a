#!/usr/bin/env bash
# The Gluon GEMV's prefetching variants (PF 1/2) on a GPU machine, in one go: the CUDA tests of
# every config, a first timing of every config on the 70B/8B shapes at M = 4, 8, 16, and Nsight
# Compute on two configs at M = 16 (28672x8192); into OUTDIR.
#   bash benchmarks/device_gluon2.sh OUTDIR "IDX1 IDX2"   (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_gluon2.sh OUTDIR [CONFIG INDICES]}
PROF=${2:-"1 9"}
source "$(dirname "$0")/device_env.sh"
EXA_CACHE_DIR=$(mktemp -d) timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf \
  --tb=short tests/test_gemv_gluon.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
timeout 200 python3 benchmarks/gluon_gemv.py --shapes ${SHAPES:-28672x8192,8192x28672,8192x8192,28672x4096} ${EXTRA:-} \
  --m 4,8,16 > "$OUT/gluon_gemv.txt" 2>&1; cut -d'|' -f1,2 "$OUT/gluon_gemv.txt"
for i in $PROF; do
  timeout 60 /usr/local/cuda/bin/ncu --kernel-name regex:_int4_gemv_gluon --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section InstructionStats --section Occupancy \
    --section MemoryWorkloadAnalysis python3 benchmarks/profile_gemv.py --shape 28672x8192 --m 16 \
    --gluon "$i" > "$OUT/ncu-$i.txt" 2>&1
  grep -E "Duration|Memory Throughput|DRAM Throughput|Issue Slots Busy|Executed Ipc A|Achieved Occ|Registers Per|Stall|rel err" "$OUT/ncu-$i.txt" | head -30
done
