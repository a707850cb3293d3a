#!/usr/bin/env bash
# benchmarks/kernels.py at decode M on the Llama shapes with the Gluon GEMV off
# (EXA_GEMV_GLUON=0) and on (the default), fresh tuning caches, same machine, same call; into OUTDIR.
#   bash benchmarks/device_gluon4.sh OUTDIR
set -u
OUT=${1:?usage: device_gluon4.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
SHAPES=4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672
for on in 0 1; do
  EXA_GEMV_GLUON=$on EXA_CACHE_DIR=$(mktemp -d) timeout 280 python3 benchmarks/kernels.py --no-bnb --m 1,4,8,16 \
    --shapes $SHAPES --out "$OUT/kernels-gluon$on.json" > "$OUT/kernels-gluon$on.txt" 2>&1
  grep -E "exa-int4" "$OUT/kernels-gluon$on.txt" | cut -c1-70; tail -1 "$OUT/kernels-gluon$on.txt"
done
