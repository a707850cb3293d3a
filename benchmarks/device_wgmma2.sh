#!/usr/bin/env bash
# benchmarks/kernels.py at prefill M on the Llama shapes with the wgmma kernel off
# (EXA_GEMM_GLUON=0) and on (the default), fresh tuning caches, same machine, same call; into OUTDIR.
#   bash benchmarks/device_wgmma2.sh OUTDIR [M list, default 256,512]
set -u
OUT=${1:?usage: device_wgmma2.sh OUTDIR}
MS=${2:-256,512}
source "$(dirname "$0")/device_env.sh"
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
for on in 0 1; do
  EXA_GEMM_GLUON=$on EXA_CACHE_DIR=$(mktemp -d) timeout 120 python3 benchmarks/kernels.py --no-bnb --formats exa-int4-g128 --m $MS \
    --shapes $SHAPES --out "$OUT/kernels-wgmma$on.json" > "$OUT/kernels-wgmma$on.txt" 2>&1
  grep -E "exa-int4" "$OUT/kernels-wgmma$on.txt" | cut -c1-90; tail -1 "$OUT/kernels-wgmma$on.txt"
done
