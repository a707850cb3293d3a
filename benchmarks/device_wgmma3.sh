#!/usr/bin/env bash
# The wgmma kernel as a decode GEMV (int_gemm_gluon.DECODE, int_gemv candidates with
# EXA_GEMV_WGMMA=1) on an H100: its CUDA tests, then kernels.py at M = 4, 8, 16 on the 70B
# shapes with it off and on (same call, fresh tuning caches), then the end-to-end CUDA tests
# (tests/test_cuda.py) with the defaults; into OUTDIR.
#   bash benchmarks/device_wgmma3.sh OUTDIR          (carry .whl)
set -u
OUT=${1:?usage: device_wgmma3.sh OUTDIR}
D=$(dirname "$0")
source "$D/device_env.sh"
EXA_CACHE_DIR=$(mktemp -d) timeout 100 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py -k "decode" > "$OUT/cuda_tests_decode.txt" 2>&1
tail -2 "$OUT/cuda_tests_decode.txt"
for on in 0 1; do
  EXA_GEMV_WGMMA=$on EXA_CACHE_DIR=$(mktemp -d) timeout 130 python3 "$D/kernels.py" --no-bnb --formats exa-int4-g128 \
    --m 4,8,16 --shapes 28672x8192,8192x28672,8192x8192 --out "$OUT/kernels-gemv-wgmma$on.json" \
    > "$OUT/kernels-gemv-wgmma$on.txt" 2>&1
  grep -E "exa-int4" "$OUT/kernels-gemv-wgmma$on.txt" | cut -c1-90
done
EXA_CACHE_DIR=$(mktemp -d) timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_cuda.py > "$OUT/cuda_tests_e2e.txt" 2>&1
tail -4 "$OUT/cuda_tests_e2e.txt"
