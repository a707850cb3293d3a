"""Dequantize rows of an ``int`` / ``nf4`` / ``fp4`` weight to a dense matrix, and the prefill
path built on it: ``x @ W.T`` as dequantize + cuBLAS, a chunk of rows at a time.

At large M a quantized GEMM is compute-bound, and cuBLAS (wgmma on Hopper) is faster than a
Triton GEMM that dequantizes in its inner loop; dequantizing once costs ~2.5 bytes of HBM
traffic per weight (read 0.5, write 2), which M >= ~512 rows of x amortize. The GEMM tuners
(``int_gemm``, ``nf4_gemm``) time this path beside their fused kernels (config key
``DEQUANT``) and keep whichever is faster for the shape and M bucket.

Memory: the dense rows live in a scratch buffer of ``CHUNK_MB`` or ``MAX_CHUNK_MB`` MiB (the
tuner times both; at least ``MIN_CHUNK_ROWS`` rows), reused chunk after chunk, so a 28672 x
8192 layer never needs its 470 MB bf16 copy at once; the planner's device overhead (>= 512 MiB)
covers it.

Reference: ``runtime.kernels.reference.dequant`` (float32, then cast): the int kernel
computes ``(q - z) * s`` in the activation dtype on the 16-bit path, as the fused kernels do,
so values can differ from the reference by one rounding of that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.common import group_of, mode_of
from runtime.kernels.tl_dequant import int_group_params, int_tile, nf4_absmax, nf4_tile
from runtime.quant.spec import QuantSpec

CHUNK_MB = 64
MAX_CHUNK_MB = 256
MIN_CHUNK_ROWS = 1024
_BLOCK_N = 64


@triton.jit
def _dequant_int_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, K, G, row0, row_end, stride_qw,
                        stride_o, BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, row_end - 1)                      # clamped: loads stay in bounds
    ks = tl.program_id(1) * BLOCK_K                             # a tile lies inside one group
    Z, S, MN = int_group_params(s_ptr, z_ptr, rows, ks // GROUP, G, BITS, MODE, DT)
    kw0 = tl.multiple_of(ks // CPW, BLOCK_K // CPW)
    w = int_tile(qw_ptr, rows, kw0, stride_qw, K, Z, S, MN, BITS, MODE, DT, False, BLOCK_N,
                 BLOCK_K, INTERP)                               # [BN, BK], natural K order
    offs_k = ks + tl.arange(0, BLOCK_K)
    o_ptrs = out_ptr + (offs_n - row0)[:, None] * stride_o + offs_k[None, :]
    tl.store(o_ptrs, w, mask=(offs_n < row_end)[:, None])


@triton.jit
def _dequant_nf4_kernel(qw_ptr, a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, lut_ptr, out_ptr, N, K,
                        G, row0, row_end, stride_o, GROUP: tl.constexpr, DQ: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERP: tl.constexpr):
    DT: tl.constexpr = out_ptr.dtype.element_ty
    offs_n = row0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, row_end - 1)
    ks = tl.program_id(1) * BLOCK_K
    A = nf4_absmax(a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, rows, ks // GROUP, G, DQ).to(DT)
    kw0 = tl.multiple_of(ks // 8, BLOCK_K // 8)
    w = nf4_tile(qw_ptr, lut_ptr, rows, kw0, K // 8, A, DT, BLOCK_N, BLOCK_K, INTERP)
    offs_k = ks + tl.arange(0, BLOCK_K)
    o_ptrs = out_ptr + (offs_n - row0)[:, None] * stride_o + offs_k[None, :]
    tl.store(o_ptrs, w, mask=(offs_n < row_end)[:, None])


def _block_k(K: int, group: int) -> int:
    """K tile: 128 or 64 codes when they divide the group and K, else the (small) group."""
    for bk in (128, 64):
        if group % bk == 0 and K % bk == 0:
            return bk
    return group


def dequantize_rows(t, spec: QuantSpec, N: int, K: int, row0: int, rows: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``row0 .. row0 + rows`` of W (``[rows, K]``, ``dtype``) on the packed tensors' device.

    Covers what ``dispatch.supported`` admits (K % 64 == 0; a power-of-two group of >= 16
    codes, or per channel). ``out``: an optional ``[>= rows, K]`` row-major buffer to fill.
    """
    from runtime.kernels.tuning import interpreting
    if not 0 <= row0 < row0 + rows <= N:
        raise ValueError(f"rows {row0}..{row0 + rows} outside a weight of {N} rows")
    g = group_of(spec, K)
    bk = _block_k(K, g)
    if K % bk or g % bk:
        raise ValueError(f"{spec.name}: K={K}, group {g} not tiled by {bk}")
    qw = t["qweight"].view(torch.int32)
    if out is None:
        out = torch.empty(rows, K, device=qw.device, dtype=dtype)
    if out.shape[0] < rows or out.shape[1] != K or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [>= {rows}, {K}] buffer")
    grid = (triton.cdiv(rows, _BLOCK_N), K // bk)
    if spec.fmt == "int":
        mode = mode_of(spec)
        zt = t["scales"] if mode == 0 else t["zeros" if mode == 1 else "mins"]
        _dequant_int_kernel[grid](
            qw, t["scales"], zt, out, N, K, K // g, row0, row0 + rows, K * spec.bits // 32,
            out.stride(0), BITS=spec.bits, GROUP=g, MODE=mode, BLOCK_N=_BLOCK_N, BLOCK_K=bk,
            INTERP=interpreting(), num_warps=4)
    elif spec.fmt in ("nf4", "fp4"):
        from runtime.kernels.nf4_gemv import absmax_args, lut
        a, aq, a2, dm, off = absmax_args(t, spec, N, K, qw.device)
        _dequant_nf4_kernel[grid](
            qw, a, aq, a2, dm, off, lut(spec.fmt, dtype, qw.device), out, N, K, K // g, row0,
            row0 + rows, out.stride(0), GROUP=g, DQ=spec.double_quant, BLOCK_N=_BLOCK_N,
            BLOCK_K=bk, INTERP=interpreting(), num_warps=4)
    else:
        raise ValueError(f"dequantize_rows handles int / nf4 / fp4, got {spec.fmt!r}")
    return out[:rows]


def chunk_rows(N: int, K: int, chunk_mb: int = CHUNK_MB, itemsize: int = 2) -> int:
    """Rows per scratch chunk: ``chunk_mb`` MiB of dense rows, at least MIN_CHUNK_ROWS, a
    multiple of 256 (whole GEMM tiles), at most N."""
    rows = max(MIN_CHUNK_ROWS, (chunk_mb << 20) // (K * itemsize) // 256 * 256)
    return min(N, rows)


def dequant_cfg(chunk_mb: int = CHUNK_MB) -> dict:
    """A GEMM tuner config that selects this path (``int_gemm`` / ``nf4_gemm`` launchers)."""
    return {"DEQUANT": True, "CHUNK_MB": chunk_mb}


def dequant_candidates() -> list[dict]:
    """The configs the GEMM tuners time: scratch of CHUNK_MB and of MAX_CHUNK_MB (fewer, larger
    cuBLAS calls; a 28672 x 8192 bf16 layer then takes two)."""
    return [dequant_cfg(CHUNK_MB), dequant_cfg(MAX_CHUNK_MB)]


def dequant_matmul(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int, cfg: dict,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ W.T``: dequantize a chunk of W's rows into scratch, multiply
    with cuBLAS (``torch.mm``) straight into the chunk's columns of ``out``, next chunk."""
    M = x.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    step = chunk_rows(N, K, cfg.get("CHUNK_MB", CHUNK_MB), x.element_size())
    scratch = torch.empty(step, K, device=x.device, dtype=x.dtype)
    for n0 in range(0, N, step):
        rows = min(step, N - n0)
        w = dequantize_rows(t, spec, N, K, n0, rows, x.dtype, out=scratch)
        torch.mm(x, w.t(), out=out if rows == N else out[:, n0:n0 + rows])
    return out
