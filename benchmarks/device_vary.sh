#!/usr/bin/env bash
# Same-run A/Bs of Gluon GEMV configs against themselves with some keys changed
# (benchmarks/gemv_ab.py --vary) on the two 70B MLP shapes at M = 8, 16, then the CUDA tests
# of test_gemv_gluon.py selected by TESTS (pytest -k; "" for none). Indices: int_gemv_gluon's
# CONFIGS + EXTRA as committed with the calling script. Into OUTDIR.
#   bash benchmarks/device_vary.sh OUTDIR TESTS TEST_SECONDS NAME:SECONDS:VARY:CONFIGS ...
set -u
OUT=${1:?usage: device_vary.sh OUTDIR TESTS TEST_SECONDS NAME:SECONDS:VARY:CONFIGS ...}
TESTS=$2; TSECS=$3; shift 3
source "$(dirname "$0")/device_env.sh"
for spec in "$@"; do
  IFS=: read -r name secs vary configs <<< "$spec"
  timeout "$secs" python3 benchmarks/gemv_ab.py --vary "$vary" --configs "$configs" --m 8,16 \
    --out "$OUT/gemv-ab-$name.json" > "$OUT/gemv-ab-$name.txt" 2>&1
  echo "$name rc=$?"; grep -E "^best|x[0-9]" "$OUT/gemv-ab-$name.txt" | sed "s/ {[^}]*}//" | cut -c1-150
done
if [ -n "$TESTS" ]; then
  timeout "$TSECS" python3 -m pytest -q -m cuda tests/test_gemv_gluon.py -k "$TESTS" > "$OUT/tests.txt" 2>&1
  echo "tests rc=$?"; grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
fi
