#!/usr/bin/env bash
# 256-row programs of 8 warps against the same configs at 128 rows and 4 warps (x read once a
# sub-tile for twice the rows), then the CUDA tests of this session's new configs
# (device_vary.sh).
#   bash benchmarks/device_bn256.sh OUTDIR
exec bash "$(dirname "$0")/device_vary.sh" "${1:?usage: device_bn256.sh OUTDIR}" \
  "fm or xl2 or 128-2] or BLOCK_N256" 330 "bn256:240:BLOCK_N=128,num_warps=4:86,87,88,89,90,91,92"
