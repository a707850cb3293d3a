#!/usr/bin/env bash
# The TMA-ring decode GEMV as int_gemv's M = 5-16 candidates (int_gemv_tma.DECODE / DECODE8, on by
# default on sm_90) on an H100: its CUDA tests and int_gemv's tuner tests, benchmarks/kernels.py
# at M (default 8,16) on the Llama shapes with it (the default) and without (EXA_GEMV_TMA=0),
# fresh tuning caches, same call; then the quantized end-to-end CUDA tests (streamed = resident,
# GPU = CPU reference); into OUTDIR.
#   bash benchmarks/device_tma_decode.sh OUTDIR [M]          (carry .whl)
set -u
OUT=${1:?usage: device_tma_decode.sh OUTDIR [M]}
M=${2:-8,16}
source "$(dirname "$0")/device_env.sh"
timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short tests/test_gemv_tma.py \
  tests/test_gemm_gluon.py tests/test_gemv_gluon.py -k "tma or tunes" > "$OUT/cuda-tests-tma.txt" 2>&1
echo "tests rc=$?"; tail -1 "$OUT/cuda-tests-tma.txt"
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
for on in 1 0; do
  EXA_GEMV_TMA=$on EXA_CACHE_DIR=$(mktemp -d) timeout 200 python3 benchmarks/kernels.py --no-bnb \
    --formats exa-int4-g128 --m "$M" --shapes $SHAPES --out "$OUT/kernels-m${M/,/-}-tma$on.json" \
    > "$OUT/kernels-m${M/,/-}-tma$on.txt" 2>&1
  echo "tma $on rc=$?"; grep -E "exa-int4|HBM" "$OUT/kernels-m${M/,/-}-tma$on.txt" | cut -c1-110
done
EXA_CACHE_DIR=$(mktemp -d) timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_cuda.py -k "quantized" > "$OUT/cuda-tests-e2e.txt" 2>&1
echo "e2e rc=$?"; tail -1 "$OUT/cuda-tests-e2e.txt"
