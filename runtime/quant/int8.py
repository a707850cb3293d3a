"""The "int8" format: LLM.int8-style row-wise int8 weights with an outlier decomposition.

Layout (see spec.py): ``qweight`` int8 ``[N, K]``, ``scales`` float32 ``[N]`` = row absmax / 127.
``W = qweight * scales[:, None]``.

Quantizer: ``q = clamp(round(w * (127 / absmax_row)), -127, 127)`` in fp32 (ties to even, as
``torch.round``); an all-zero row gets scale 0 and codes 0. -128 is never produced.

Run time (``linear``), with ``x [M, K]`` (leading dims flattened) and ``t = spec.threshold``:

1. outlier columns: ``cols = {j : max_i |x[i, j]| > t}`` (none when ``t <= 0``, as in
   bitsandbytes where threshold 0 disables the decomposition);
2. ``y_out = x[:, cols] @ W[:, cols].T`` in x.dtype with the dequantized weight columns;
3. the other columns: per-row absmax ``a_i`` of x (outlier columns zeroed),
   ``xq = round(x * 127 / a_i)`` int8, ``acc = xq @ qweight.T`` exactly in int32
   (``torch._int_mm`` on CUDA when the shapes allow, else an exact fp32/fp64 emulation),
   ``y_in = acc * (a_i / 127) * scales[n]`` in fp32;
4. ``y = (y_in + y_out + bias)`` in fp32, cast to x.dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Shapes, check_tensors, check_weight, kernel_linear
from .spec import QuantSpec

__all__ = ["packed_shapes", "quantize", "dequantize", "linear", "quantize_rows", "int8_matmul"]

_EXACT_FP32 = 2 ** 24  # fp32 represents every integer up to this exactly


def packed_shapes(spec: QuantSpec, N: int, K: int) -> Shapes:
    """``qweight`` int8 ``[N, K]`` and ``scales`` float32 ``[N]``; any positive N, K."""
    if spec.fmt != "int8":
        raise ValueError(f"int8 handles fmt 'int8', got {spec.fmt!r}")
    if N <= 0 or K <= 0:
        raise ValueError(f"{spec.name}: weight shape must be positive, got [{N}, {K}]")
    return {"qweight": ((N, K), torch.int8), "scales": ((N,), torch.float32)}


def quantize_rows(a: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise absmax int8: ``a [M, K]`` -> (codes int8 ``[M, K]``, scale fp32 ``[M]`` = absmax/127)."""
    a = a.float()
    amax = a.abs().amax(-1)                                                   # [M]
    inv = 127.0 / torch.where(amax == 0, torch.ones_like(amax), amax)
    q = torch.round(a * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)  # [M, K]
    return q, amax / 127.0


def quantize(w: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """Row-wise absmax RTN of ``w [N, K]`` (any float dtype, CPU or CUDA)."""
    N, K = check_weight(w, spec)
    packed_shapes(spec, N, K)
    q, s = quantize_rows(w.detach())
    return {"qweight": q, "scales": s}


def dequantize(t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``W [N, K] = qweight * scales[:, None]`` (fp32), cast to ``dtype``."""
    check_tensors(t, packed_shapes(spec, N, K), spec)
    return (t["qweight"].float() * t["scales"].float().unsqueeze(-1)).to(dtype)


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``a [M, K] int8 @ b [N, K].T int8 -> int32 [M, N]``."""
    M, K = a.shape
    N = b.shape[0]
    if a.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0:
        try:
            return torch._int_mm(a.contiguous(), b.t())
        except RuntimeError:
            pass  # shape/arch not supported by cuBLASLt: fall through to the emulation
    # |a_ij * b_nj| <= 127*127, so the fp32 sum is exact while K * 16129 < 2**24, fp64 always.
    ft = torch.float32 if K * 127 * 127 < _EXACT_FP32 else torch.float64
    return (a.to(ft) @ b.to(ft).t()).to(torch.int32)


def linear(x: Tensor, t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
           bias: Optional[Tensor] = None) -> Tensor:
    """LLM.int8 ``x [..., K] -> [..., N]`` (see the module docstring for the exact steps)."""
    y = kernel_linear(x, t, spec, N, K, bias)
    if y is not None:
        return y
    check_tensors(t, packed_shapes(spec, N, K), spec)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)                                                     # [M, K]
    qw, sw = t["qweight"], t["scales"].float()                                # [N, K], [N]
    y = torch.zeros(x2.shape[0], N, dtype=torch.float32, device=x.device)    # [M, N]
    if spec.threshold > 0 and x2.numel():
        cols = ((x2.abs() > spec.threshold).any(0)).nonzero().flatten()     # [C]
    else:
        cols = torch.empty(0, dtype=torch.long, device=x.device)
    if cols.numel():
        w_out = (qw[:, cols].float() * sw.unsqueeze(-1)).to(x.dtype)        # [N, C]
        y += F.linear(x2[:, cols], w_out).float()
        x2 = x2.clone()
        x2[:, cols] = 0
    if cols.numel() < K:
        xq, sx = quantize_rows(x2)                                            # [M, K], [M]
        y += int8_matmul(xq, qw).float() * (sx.unsqueeze(-1) * sw.unsqueeze(0))
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, N)
