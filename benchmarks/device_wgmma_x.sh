#!/usr/bin/env bash
# The wgmma kernel as a decode GEMV, tried configs (int_gemm_gluon.DECODE_X) on an H100: its
# CUDA tests, then each DECODE_X config with key KEY against itself with KEY=OFF
# (gemv_ab.py --wgmma --vary) on the two 70B MLP shapes at M = 8, 16, and the Gluon GEMV's
# picks (int_gemv_gluon CONFIGS 18, 20, 21, 22) in the same call as the peer; into OUTDIR.
#   bash benchmarks/device_wgmma_x.sh OUTDIR [KEY OFF [TESTS]]  (default ZP 0; TESTS: pytest -k,
#   default "decode"; carry .whl)
set -u
OUT=${1:?usage: device_wgmma_x.sh OUTDIR [KEY OFF [TESTS]]}
KEY=${2:-ZP}; OFF=${3:-0}; TESTS=${4:-decode}
source "$(dirname "$0")/device_env.sh"
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py -k "$TESTS" > "$OUT/cuda-tests-wgmma-$KEY.txt" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/cuda-tests-wgmma-$KEY.txt"
X=$(python3 -c "from runtime.kernels import int_gemm_gluon as W; n = len(W.DECODE); print(','.join(str(n + i) for i, c in enumerate(W.DECODE_X) if '$KEY' in c))")
timeout 240 python3 benchmarks/gemv_ab.py --wgmma --vary "$KEY=$OFF" --configs "$X" --m 8,16 \
  --out "$OUT/gemv-ab-wgmma-$KEY.json" > "$OUT/gemv-ab-wgmma-$KEY.txt" 2>&1
echo "wgmma rc=$?"; grep -E "^best|x[0-9]|alone" "$OUT/gemv-ab-wgmma-$KEY.txt" | sed "s/ {[^}]*}//" | cut -c1-150
timeout 90 python3 benchmarks/gemv_ab.py --configs 18,20,21,22 --m 8,16 \
  --out "$OUT/gemv-ab-picks.json" > "$OUT/gemv-ab-picks.txt" 2>&1
echo "picks rc=$?"; grep -E "^best" "$OUT/gemv-ab-picks.txt"
