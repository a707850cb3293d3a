#!/usr/bin/env bash
# The TMA-ring, warp-specialized decode GEMV (runtime/kernels/int_gemv_tma.py) on an H100: its
# CUDA tests (reference, bits equal to the cp.async wgmma kernel), its configs on the two 70B
# MLP shapes at M = 8 and 16, and in the same call the cp.async wgmma kernel's best decode
# configs (int_gemm_gluon.DECODE 0, 1) and the Gluon GEMV's picks; into OUTDIR.
#   bash benchmarks/device_tma.sh OUTDIR [M [CONFIGS]]   (CONFIGS: indices into int_gemv_tma.CONFIGS,
#   default all; carry .whl)
set -u
OUT=${1:?usage: device_tma.sh OUTDIR [M [CONFIGS]]}
M=${2:-8,16}
SEL=${3:+--configs $3}
source "$(dirname "$0")/device_env.sh"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemv_tma.py > "$OUT/cuda-tests-tma.txt" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/cuda-tests-tma.txt"
timeout 200 python3 benchmarks/gemv_ab.py --tma --m "$M" $SEL --out "$OUT/gemv-ab-tma.json" \
  > "$OUT/gemv-ab-tma.txt" 2>&1
echo "tma rc=$?"; grep -E "^best|us \(|alone" "$OUT/gemv-ab-tma.txt" | sed "s/ {[^}]*}//" | cut -c1-150
timeout 80 python3 benchmarks/gemv_ab.py --wgmma --configs 0,1 --m "$M" \
  --out "$OUT/gemv-ab-wgmma-ring.json" > "$OUT/gemv-ab-wgmma-ring.txt" 2>&1
echo "ring rc=$?"; grep -E "^best" "$OUT/gemv-ab-wgmma-ring.txt"
timeout 80 python3 benchmarks/gemv_ab.py --configs 18,20,21,22 --m "$M" \
  --out "$OUT/gemv-ab-picks.json" > "$OUT/gemv-ab-picks.txt" 2>&1
echo "picks rc=$?"; grep -E "^best" "$OUT/gemv-ab-picks.txt"
