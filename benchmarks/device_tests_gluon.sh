#!/usr/bin/env bash
# The CUDA tests of the Gluon kernels (GEMV, stream-K, wgmma GEMM), the fused split-K fixups and
# the end-to-end offload tests; into OUTDIR.
#   bash benchmarks/device_tests_gluon.sh OUTDIR
set -u
OUT=${1:?usage: device_tests_gluon.sh OUTDIR}
source "$(dirname "$0")/device_env.sh"
timeout 330 python3 -m pytest -q -m cuda tests/test_gemv_gluon.py tests/test_gemv_streamk.py \
  tests/test_gemm_gluon.py tests/test_splitk_fixup.py tests/test_cuda.py > "$OUT/tests.txt" 2>&1
echo "rc=$?"; grep -E "passed|failed|Error" "$OUT/tests.txt" | tail -5
