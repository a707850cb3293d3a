#!/usr/bin/env bash
# The Gluon GEMV prototype (runtime/kernels/int_gemv_gluon.py) on a GPU machine, in one go: its
# CUDA tests, a first timing per config, then benchmarks/kernels.py at M = 1..16 on the Llama
# shapes without and with it offered to the tuner (EXA_GEMV_GLUON=1; fresh tuning caches, same
# run); into OUTDIR.
#   bash benchmarks/device_gluon.sh OUTDIR          (carry .whl: pytest and its wheels)
set -u
OUT=${1:?usage: device_gluon.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
EXA_GEMV_GLUON=1 EXA_CACHE_DIR=$(mktemp -d) timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf \
  --tb=short tests/test_gemv_gluon.py tests/test_kernels.py -k "gluon or gemv" > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
timeout 100 python3 benchmarks/gluon_gemv.py > "$OUT/gluon_gemv.txt" 2>&1; cat "$OUT/gluon_gemv.txt" | cut -c1-400
SHAPES=28672x8192,8192x28672,8192x8192,4096x4096
for on in 0 1; do
  EXA_GEMV_GLUON=$on EXA_CACHE_DIR=$(mktemp -d) timeout 160 python3 benchmarks/kernels.py --no-bnb --m 1,4,8,16 \
    --shapes $SHAPES --out "$OUT/kernels-gluon$on.json" > "$OUT/kernels-gluon$on.txt" 2>&1
  tail -18 "$OUT/kernels-gluon$on.txt"
done
