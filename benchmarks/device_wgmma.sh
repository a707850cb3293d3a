#!/usr/bin/env bash
# The wgmma prefill prototype (runtime/kernels/int_gemm_gluon.py) on an H100, in one go: its
# CUDA tests, then a first timing beside the tuned int_gemm and cuBLAS bf16; into OUTDIR.
#   bash benchmarks/device_wgmma.sh OUTDIR          (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_wgmma.sh OUTDIR}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
EXA_CACHE_DIR=$(mktemp -d) timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemm_gluon.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
EXA_CACHE_DIR=$(mktemp -d) timeout 300 python3 benchmarks/gluon_gemm.py > "$OUT/gluon_gemm.txt" 2>&1
cut -c1-300 "$OUT/gluon_gemm.txt"
