#!/usr/bin/env bash
# Stream-K GEMV: its CUDA tests, benchmarks/gemv_ceiling.py with the stream-K configs beside the
# same ring configs on a plain grid, then benchmarks/kernels.py (exa int4 g128, decode M, fresh
# tuning cache: the tuner may now pick stream-K); into OUTDIR.
#   bash benchmarks/device_streamk.sh OUTDIR
set -u
OUT=${1:?usage: device_streamk.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -m cuda tests/test_gemv_streamk.py > "$OUT/tests.txt" 2>&1
tail -3 "$OUT/tests.txt"
timeout 150 python3 benchmarks/gemv_ceiling.py --no-load --no-alu --configs 12,13,18,19,20,21 \
  --shapes 28672x8192,8192x28672,8192x8192,14336x4096 --m 4,8,16 --out "$OUT/streamk.json" \
  > "$OUT/streamk.txt" 2>&1
sed -E 's/\{.*\}//' "$OUT/streamk.txt" | tail -50
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
EXA_CACHE_DIR=$(mktemp -d) timeout 280 python3 benchmarks/kernels.py --no-bnb --formats exa-int4-g128 \
  --m 1,4,8,16 --shapes $SHAPES --out "$OUT/kernels-decode.json" > "$OUT/kernels-decode.txt" 2>&1
grep -E "exa-int4" "$OUT/kernels-decode.txt" | cut -c1-90; tail -1 "$OUT/kernels-decode.txt"
