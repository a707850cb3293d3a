#!/usr/bin/env bash
# ELEM configs of the planes GEMV (runtime/kernels/int_gemv_planes.py) on a GPU machine, in one go:
# their CUDA tests, the tuner's timings at M = 8 and 16 on two 70B shapes with the per-plane and ELEM
# configs offered (EXA_GEMV_PLANES=1, fresh cache), and Nsight Compute's L1 / shared-memory
# counters of one ELEM launch beside the tensor-core one; into OUTDIR (carry .whl: pytest's wheels).
set -u
OUT=${1:?usage: device_elem.sh OUTDIR}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EXA_GEMV_PLANES=1
EXA_CACHE_DIR=$(mktemp -d) timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
  tests/test_gemv_planes.py > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
EXA_CACHE_DIR=$(mktemp -d) timeout 200 python3 benchmarks/kernels.py --no-bnb --m 8,16 \
  --shapes 28672x8192,8192x8192 --out "$OUT/kernels-elem.json" > "$OUT/kernels-elem.txt" 2>&1
grep "exa-int4" "$OUT/kernels-elem.txt"
M="l1tex__data_pipe_lsu_wavefronts.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__time_duration.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for a in "--m 16 --elem" "--m 16"; do
  timeout 90 "$NCU" --target-processes all --kernel-name regex:_int_gemv_kernel\|_planes_kernel --launch-skip 2 \
    --launch-count 1 --metrics "$M" python3 benchmarks/profile_gemv.py $a > "$OUT/ncu-${a// /_}.txt" 2>&1
  grep -E "^\s+(l1tex|dram|gpu__|sm__)|rel err" "$OUT/ncu-${a// /_}.txt"
done
