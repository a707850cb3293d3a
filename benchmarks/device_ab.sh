#!/usr/bin/env bash
# The Gluon GEMV's CUDA tests, then benchmarks/gemv_ab.py: this tree's int_gemv_gluon.py against
# another copy of it (OLD, e.g. `git show HEAD:runtime/kernels/int_gemv_gluon.py > .ab/old.py`,
# carried as an untracked file), same run; into OUTDIR.
#   bash benchmarks/device_ab.sh OUTDIR OLD [CONFIGS] [Ms] [SHAPES]
set -u
OUT=${1:?usage: device_ab.sh OUTDIR OLD [CONFIGS] [Ms] [SHAPES]}
OLD=${2:?usage: device_ab.sh OUTDIR OLD [CONFIGS] [Ms] [SHAPES]}
source "$(dirname "$0")/device_env.sh"
timeout 240 python3 -m pytest -q -m cuda tests/test_gemv_gluon.py tests/test_gemv_streamk.py \
  > "$OUT/tests.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
timeout 320 python3 benchmarks/gemv_ab.py --old "$OLD" ${3:+--configs $3} --m "${4:-4,16}" \
  --shapes "${5:-28672x8192,8192x28672}" --out "$OUT/gemv-ab.json" > "$OUT/gemv-ab.txt" 2>&1
echo "ab rc=$?"; cat "$OUT/gemv-ab.txt" | cut -c1-220
