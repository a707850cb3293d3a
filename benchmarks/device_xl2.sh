#!/usr/bin/env bash
# XL 2 (x one sub-tile ahead) against XL 1, FM (x loaded without a mask at M = BLOCK_M) against
# the masked loads, 2-warp programs (64 rows a warp) against 4 warps; then their CUDA tests
# (device_vary.sh; run 2026-11-27 at the commit that added this script).
#   bash benchmarks/device_xl2.sh OUTDIR
exec bash "$(dirname "$0")/device_vary.sh" "${1:?usage: device_xl2.sh OUTDIR}" \
  "fm or xl2 or 128-2]" 120 "xl2:260:XL=1:20,21,22,71,72,73,74,75,76,77,78,79,80" \
  "fm:130:FM=False:67,68,69,70,81,82,83" "nw2:70:num_warps=4:84,85"
