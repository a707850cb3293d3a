#!/usr/bin/env bash
# The quantized-weights work on a GPU machine, in one go; results land in OUTDIR.
#   bash benchmarks/device_quant.sh OUTDIR [tests] [kernels] [stream]     (default: all three)
# Expects the wheels of pytest (+ iniconfig, pluggy, packaging) and bitsandbytes in .whl/.
set -u
OUT=${1:?usage: device_quant.sh OUTDIR [stage...]}; shift
STAGES=${*:-tests kernels stream}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD EXA_CACHE_DIR=$PWD/.cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
for s in $STAGES; do
  t0=$(date +%s)
  case $s in
    tests)   timeout 150 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short --durations=5 \
               tests/test_cuda.py > "$OUT/cuda_tests.txt" 2>&1
             timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short --durations=5 \
               tests/test_kernels.py > "$OUT/cuda_kernel_tests.txt" 2>&1 ;;
    kernels) timeout 360 python3 benchmarks/kernels.py --out "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1 ;;
    stream)  timeout 330 python3 benchmarks/offload_stream.py --part exa --quant int4 --cap 3GiB \
               --dir "$PWD/.bench" --out "$OUT/stream_int4.json" > "$OUT/stream_int4.txt" 2>&1 ;;
  esac
  echo "$s: rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/stages.txt"
done
