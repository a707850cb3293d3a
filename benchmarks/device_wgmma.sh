#!/usr/bin/env bash
# The wgmma prefill kernel (runtime/kernels/int_gemm_gluon.py) on an H100: its CUDA tests with
# int_gemm's and the prefill / kernel suites' (the kernel is a tuner candidate there), then,
# unless the second argument is "nobench", each config's time beside int_gemm (Triton alone)
# and cuBLAS bf16 at M = 256; into OUTDIR.  Then: benchmarks/device_wgmma2.sh for kernels.py.
#   bash benchmarks/device_wgmma.sh OUTDIR [nobench]       (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_wgmma.sh OUTDIR [nobench]}
D=$(dirname "$0")
source "$D/device_env.sh"
EXA_CACHE_DIR=$(mktemp -d) timeout 330 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py tests/test_prefill_gemm.py tests/test_kernels.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
if [ "${2:-}" != nobench ]; then
  EXA_CACHE_DIR=$(mktemp -d) EXA_GEMM_GLUON=0 timeout 150 python3 "$D/gluon_gemm.py" --m 256 > "$OUT/gluon_gemm.txt" 2>&1
  cut -c1-900 "$OUT/gluon_gemm.txt"
fi
