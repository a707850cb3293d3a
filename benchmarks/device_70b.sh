#!/usr/bin/env bash
# The 70B-shaped runs on a lent GPU machine, in one go; results land in OUTDIR.
#   bash benchmarks/device_70b.sh OUTDIR [stage...]
# stages: tests (CUDA tests), synth, cluster (2 GPUs), bounds, b24, budgets (16/12 GiB), batch, disk, kernels_tests,
#   profile (torch.profiler of 70B decode, resident and 24 GiB), side (13B bf16 at 8 GiB: accelerate vs exa bf16 vs int4;
#   deletes the 70B checkpoint for disk space)
# The checkpoint (~38 GiB) is written once to .bench/ and reused while the machine lives.
# Rough wall times on an H100/H200 x2 host (2026-11-26): synth 60 s, cluster ~250 s (cold tuning
# cache), bounds 25 s, b24 (auto + stream-only, 128 tokens each) ~200 s, budgets ~250 s,
# batch ~90 s, disk ~120 s, tests ~60 s. DEADLINE=seconds skips the stages that would start later.
set -u
OUT=${1:?usage: device_70b.sh OUTDIR [stage...]}; shift
STAGES=${*:-synth cluster bounds b24}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD EXA_CACHE_DIR=$PWD/.cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" >> "$OUT/gpu.txt"
(nproc; free -g; df -h .) >> "$OUT/gpu.txt" 2>&1
B="python3 benchmarks/llm70b.py --dir $PWD/.bench --out $OUT/llm70b.json"
M=$PWD/.bench/llama3-70b-shape-int4
START=$(date +%s)
for s in $STAGES; do
  t0=$(date +%s)
  if [ -n "${DEADLINE:-}" ] && [ $(( t0 - START )) -ge "$DEADLINE" ]; then
    echo "$s: skipped (past the ${DEADLINE} s deadline)" | tee -a "$OUT/stages.txt"; continue
  fi
  case $s in
    tests)   timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short --durations=5 \
               tests/test_cuda.py tests/test_fastload.py > "$OUT/cuda_tests.txt" 2>&1 ;;
    kernels_tests) timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
               tests/test_kernels.py > "$OUT/cuda_kernel_tests.txt" 2>&1 ;;
    hybrid_tests) timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rf --tb=short \
               tests/test_cuda_hybrid.py > "$OUT/cuda_hybrid_tests.txt" 2>&1 ;;
    synth)   $B --steps synth >> "$OUT/llm70b.txt" 2>&1 ;;
    cluster) timeout ${CLUSTER_TIMEOUT:-480} python3 benchmarks/cluster.py --gpus 2 --budget 24GiB --model $M \
               --prompt 256 --new-tokens 12 --batch 32 --isolate --out "$OUT/cluster.json" > "$OUT/cluster.txt" 2>&1 ;;
    bounds)  $B --steps bounds >> "$OUT/llm70b.txt" 2>&1 ;;
    b24)     $B --steps budgets --budgets 24GiB,24GiB/never >> "$OUT/llm70b.txt" 2>&1 ;;
    budgets) $B --steps budgets --budgets 16GiB,12GiB --new-tokens 64 >> "$OUT/llm70b.txt" 2>&1 ;;
    batch)   $B --steps batch >> "$OUT/llm70b.txt" 2>&1 ;;
    disk)    $B --steps disk >> "$OUT/llm70b.txt" 2>&1 ;;
    profile) for cap in "" 24GiB; do timeout 240 python3 benchmarks/profile_decode.py $M ${cap:+--cap $cap} \
               --out "$OUT" > /dev/null 2>> "$OUT/llm70b.txt"; done ;;
    side)    rm -rf "$M"        # the 13B bf16 checkpoint needs the disk space (~24 GiB)
             for part in "exa" "exa --quant int4" "accelerate"; do tag=$(echo $part | tr -d ' -'); \
               timeout 300 python3 benchmarks/offload_stream.py --cap 8GiB --dir $PWD/.bench --part $part \
               --out "$OUT/side_$tag.json" >> "$OUT/side.txt" 2>&1; done ;;
  esac
  echo "$s: rc=$? $(( $(date +%s) - t0 )) s" | tee -a "$OUT/stages.txt"
done
cp -f .cache/tuning.json "$OUT/tuning.json" 2>/dev/null || true
