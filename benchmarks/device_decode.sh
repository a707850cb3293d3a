#!/usr/bin/env bash
# benchmarks/kernels.py, exa int4 g128 at decode M on the Llama shapes (fresh tuning cache), then
# the Gluon kernels' CUDA tests; into OUTDIR.
#   bash benchmarks/device_decode.sh OUTDIR [Ms]
set -u
OUT=${1:?usage: device_decode.sh OUTDIR [Ms]}
source "$(dirname "$0")/device_env.sh"
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
EXA_CACHE_DIR=$(mktemp -d) timeout 330 python3 benchmarks/kernels.py --no-bnb --formats exa-int4-g128 \
  --m "${2:-1,4,8,16}" --shapes $SHAPES --out "$OUT/kernels-decode.json" > "$OUT/kernels-decode.txt" 2>&1
grep -E "exa-int4" "$OUT/kernels-decode.txt" | cut -c1-90; tail -1 "$OUT/kernels-decode.txt"
timeout 200 python3 -m pytest -q -m cuda tests/test_gemv_gluon.py tests/test_gemm_gluon.py \
  > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt"
