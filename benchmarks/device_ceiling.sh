#!/usr/bin/env bash
# The Gluon GEMV's CUDA tests (split K summed in the kernel), then benchmarks/gemv_ceiling.py:
# load-pattern ceiling, stride-0 (compute) ceiling and real time per config; into OUTDIR.
#   bash benchmarks/device_ceiling.sh OUTDIR [SHAPES] [Ms]
set -u
OUT=${1:?usage: device_ceiling.sh OUTDIR [SHAPES] [Ms]}
source "$(dirname "$0")/device_env.sh"
timeout 200 python3 -m pytest -q -m cuda tests/test_gemv_gluon.py tests/test_splitk_fixup.py \
  > "$OUT/tests.txt" 2>&1; tail -3 "$OUT/tests.txt"
timeout 380 python3 benchmarks/gemv_ceiling.py --shapes "${2:-28672x8192,8192x28672}" --m "${3:-4,8,16}" \
  --out "$OUT/ceiling.json" > "$OUT/ceiling.txt" 2>&1
grep -E "HBM|ceiling|Error|error" "$OUT/ceiling.txt" | head; tail -2 "$OUT/ceiling.txt"
