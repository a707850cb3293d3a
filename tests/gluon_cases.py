"""Inputs shared by the Gluon kernels' CUDA tests (test_gemm_gluon.py, test_gemv_tma.py)."""
from __future__ import annotations

import torch

from runtime.quant import intq


def group_scaled_case(N: int, K: int, M: int, spec, seed: int):
    """int4 weights whose 128-wide groups have their scales set apart (so zeros/scales taken from
    the wrong sub-tile show), bf16 x and the float32 reference: (packed, x, x @ W.T)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.05
    w *= torch.rand(1, K // 128, device="cuda", generator=g).repeat_interleave(128, 1) + 0.1
    t = intq.quantize(w, spec)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    return t, x, x.float() @ intq.dequantize(t, spec, N, K).T
