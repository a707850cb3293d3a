#!/usr/bin/env bash
# The per-plane tensor-core GEMV (runtime/kernels/int_gemv_planes.py) on a GPU machine, in one go:
# its CUDA tests and the kernel suite's with it offered to the tuner, then benchmarks/kernels.py at
# M = 2..16 on the Llama shapes with and without it (fresh tuning caches, same run); into OUTDIR.
#   bash benchmarks/device_planes.sh OUTDIR          (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_planes.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
EXA_GEMV_PLANES=1 EXA_CACHE_DIR=$(mktemp -d) timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider -rf \
  --tb=short tests/test_gemv_planes.py tests/test_kernels.py tests/test_simt_m.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
SHAPES=28672x8192,8192x28672,8192x8192,14336x4096,4096x4096
for on in 0 1; do
  EXA_GEMV_PLANES=$on EXA_CACHE_DIR=$(mktemp -d) timeout 240 python3 benchmarks/kernels.py --no-bnb --m 2,4,8,16 \
    --shapes $SHAPES --out "$OUT/kernels-planes$on.json" > "$OUT/kernels-planes$on.txt" 2>&1
  tail -25 "$OUT/kernels-planes$on.txt"
done
