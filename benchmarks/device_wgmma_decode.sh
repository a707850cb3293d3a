#!/usr/bin/env bash
# The wgmma decode configs (int_gemm_gluon.DECODE, offered at M = 9-16 on sm_90 with
# EXA_GEMV_WGMMA=1) on an H100: their CUDA tests, then benchmarks/kernels.py at M = 16 on the
# Llama shapes without them (EXA_GEMV_WGMMA=0, the default) and with them, fresh tuning caches,
# same call; into OUTDIR.
#   bash benchmarks/device_wgmma_decode.sh OUTDIR          (carry .whl)
set -u
OUT=${1:?usage: device_wgmma_decode.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
timeout 120 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short tests/test_gemm_gluon.py \
  -k "decode_configs or tunes_with_the_decode or offers" > "$OUT/cuda-tests-wgmma-decode.txt" 2>&1
echo "tests rc=$?"; tail -1 "$OUT/cuda-tests-wgmma-decode.txt"
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
for on in 0 1; do
  EXA_GEMV_WGMMA=$on EXA_CACHE_DIR=$(mktemp -d) timeout 200 python3 benchmarks/kernels.py --no-bnb \
    --formats exa-int4-g128 --m 16 --shapes $SHAPES --out "$OUT/kernels-m16-wgmma$on.json" \
    > "$OUT/kernels-m16-wgmma$on.txt" 2>&1
  echo "wgmma $on rc=$?"; grep -E "exa-int4|HBM" "$OUT/kernels-m16-wgmma$on.txt" | cut -c1-110
done
