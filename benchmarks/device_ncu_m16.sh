#!/usr/bin/env bash
# Nsight Compute on the M = 16 decode kernels of 28672x8192 (one H100): the wgmma kernel's
# first decode configs (int_gemm_gluon.DECODE 0, 1) against the Gluon GEMV's M = 16 pick
# (CONFIGS 21) and its M = 8 pick at M = 8 (CONFIGS 22, 72% of HBM); full sections; into OUTDIR.
#   bash benchmarks/device_ncu_m16.sh OUTDIR        (carry .whl)
set -u
OUT=${1:?usage: device_ncu_m16.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
NCU=/usr/local/cuda/bin/ncu
SEC="--section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis --section InstructionStats --section LaunchStats --metrics regex:smsp__warp_issue_stalled_.*_per_warp_active.pct"
run() {  # name, kernel regex, profile_gemv args
  local name=$1 re=$2; shift 2
  timeout 120 $NCU --kernel-name "regex:$re" --launch-skip 3 --launch-count 1 $SEC \
    python3 benchmarks/profile_gemv.py --shape 28672x8192 "$@" > "$OUT/ncu-$name.txt" 2>&1
  echo "== $name rc=$?"
  grep -E "Duration|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps Per Scheduler|Registers Per|Achieved Occupancy|Theoretical Occupancy|Warp Cycles Per Issued|Executed Instructions  |Block Limit" "$OUT/ncu-$name.txt" | sed 's/  */ /g' | head -20
  grep -E "warp_issue_stalled" "$OUT/ncu-$name.txt" | awk '{print $NF, $1}' | sort -rn | head -6
}
run wgmma0-m16 _int4_gemm_wgmma --m 16 --wgmma 0
run wgmma1-m16 _int4_gemm_wgmma --m 16 --wgmma 1
run gemv21-m16 _int4_gemv_gluon --m 16 --gluon 21
run gemv22-m8 _int4_gemv_gluon --m 8 --gluon 22
