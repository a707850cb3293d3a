#!/usr/bin/env bash
# The wgmma prefill prototype (runtime/kernels/int_gemm_gluon.py) on an H100, in one go: its
# CUDA tests, then a first timing beside the tuned int_gemm and cuBLAS bf16; into OUTDIR.
#   bash benchmarks/device_wgmma.sh OUTDIR          (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_wgmma.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
EXA_CACHE_DIR=$(mktemp -d) timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
EXA_CACHE_DIR=$(mktemp -d) timeout 300 python3 benchmarks/gluon_gemm.py > "$OUT/gluon_gemm.txt" 2>&1
cut -c1-300 "$OUT/gluon_gemm.txt"
