#!/usr/bin/env bash
# Tuning with a cold L2 (EXA_TUNE_COLD, runtime/kernels/tuning.py) against back-to-back graph
# timing: kernels.py (which itself times over weight copies, so from HBM) on the shapes that
# fit in L2, at decode and prefill M, once with each (same call, fresh tuning caches); into OUTDIR.
#   bash benchmarks/device_cold.sh OUTDIR
set -u
OUT=${1:?usage: device_cold.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
for c in 0 1; do
  EXA_TUNE_COLD=$c EXA_CACHE_DIR=$(mktemp -d) timeout 270 python3 benchmarks/kernels.py --no-bnb \
    --formats exa-int4-g128 --m 1,4,16,256 --shapes 4096x4096,14336x4096,4096x14336,8192x8192 \
    --out "$OUT/kernels-cold$c.json" > "$OUT/kernels-cold$c.txt" 2>&1
  grep -E "exa-int4" "$OUT/kernels-cold$c.txt" | cut -c1-80; tail -1 "$OUT/kernels-cold$c.txt"
done
