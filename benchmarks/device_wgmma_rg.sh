#!/usr/bin/env bash
# The wgmma decode GEMV with ptxas register caps (RG: maxnreg 72 / 64 / 56, so 7-9 programs an
# SM) on split-K configs, on an H100: their CUDA tests, each RG config against itself uncapped
# (gemv_ab.py --wgmma --vary RG=None) on the two 70B MLP shapes at M = 16, DECODE 0 (the best
# uncapped config) alongside, then the Gluon GEMV's picks in the same call; into OUTDIR.
#   bash benchmarks/device_wgmma_rg.sh OUTDIR [M]      (carry .whl)
set -u
OUT=${1:?usage: device_wgmma_rg.sh OUTDIR [M]}
M=${2:-16}
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py -k "decode_x and RG" > "$OUT/cuda-tests-wgmma-rg.txt" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/cuda-tests-wgmma-rg.txt"
X=$(python3 -c "from runtime.kernels import int_gemm_gluon as W; n = len(W.DECODE); print(','.join(['0'] + [str(n + i) for i, c in enumerate(W.DECODE_X) if c.get('RG')]))")
timeout 300 python3 benchmarks/gemv_ab.py --wgmma --vary RG=None --configs "$X" --m "$M" \
  --out "$OUT/gemv-ab-wgmma-rg.json" > "$OUT/gemv-ab-wgmma-rg.txt" 2>&1
echo "RG rc=$?"; grep -E "^best|x[0-9]|alone" "$OUT/gemv-ab-wgmma-rg.txt" | sed "s/ {[^}]*}//" | cut -c1-150
timeout 60 python3 benchmarks/gemv_ab.py --configs 18,20,21,22 --m "$M" \
  --out "$OUT/gemv-ab-picks.json" > "$OUT/gemv-ab-picks.txt" 2>&1
echo "picks rc=$?"; grep -E "^best" "$OUT/gemv-ab-picks.txt"
