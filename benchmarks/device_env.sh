# Sourced by the benchmarks/device_*.sh scripts after OUT is set: makes OUT, installs the
# carried wheels in .whl/ (pytest and its dependencies) when there are any, sets PYTHONPATH,
# and records the GPU, driver, torch and triton versions in $OUT/gpu.txt.
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$OUT/gpu.txt"
