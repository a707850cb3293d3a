#!/usr/bin/env bash
# The wgmma decode GEMV with the packed words loaded into registers (WR) on an H100: their CUDA
# tests, each WR config against itself through the ring (WR=0) on the two 70B MLP shapes at
# M = 16, then the Gluon GEMV's picks in the same call; into OUTDIR. (As run on 2026-11-27 it
# also timed XR, x's whole K slice resident in shared memory: its output was wrong, not kept.)
#   bash benchmarks/device_wgmma_wr.sh OUTDIR [M]      (carry .whl)
set -u
OUT=${1:?usage: device_wgmma_wr.sh OUTDIR [M]}
M=${2:-16}
source "$(dirname "$0")/device_env.sh"
timeout 170 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py -k "decode_x and WR" > "$OUT/cuda-tests-wgmma-wr.txt" 2>&1
echo "tests rc=$?"; tail -2 "$OUT/cuda-tests-wgmma-wr.txt"
for kv in WR=0; do
  key=${kv%%=*}
  X=$(python3 -c "from runtime.kernels import int_gemm_gluon as W; n = len(W.DECODE); print(','.join(str(n + i) for i, c in enumerate(W.DECODE_X) if c.get('$key')))")
  timeout 200 python3 benchmarks/gemv_ab.py --wgmma --vary "$kv" --configs "$X" --m "$M" \
    --out "$OUT/gemv-ab-wgmma-$key.json" > "$OUT/gemv-ab-wgmma-$key.txt" 2>&1
  echo "$key rc=$?"; grep -E "^best|x[0-9]|alone" "$OUT/gemv-ab-wgmma-$key.txt" | sed "s/ {[^}]*}//" | cut -c1-150
done
timeout 60 python3 benchmarks/gemv_ab.py --configs 18,20,21,22 --m "$M" \
  --out "$OUT/gemv-ab-picks.json" > "$OUT/gemv-ab-picks.txt" 2>&1
echo "picks rc=$?"; grep -E "^best" "$OUT/gemv-ab-picks.txt"
