"""x copied into the wgmma kernels' K order (``int_gemm_gluon.order``): in every 128-wide sub-tile
of K, logical position k' holds physical k, a permutation of k's 7 bits (``order_bits``:
logical bit b -> physical bit, read off ``order()``). One Triton kernel (a gather within each 256-byte sub-tile, stored
contiguously); the torch reference is ``int_gemm_gluon.permute_x_ref`` (index_select), used on the
CPU and checked bit for bit against this on the GPU.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@functools.cache
def order_bits() -> tuple[int, ...]:
    """For each bit b of the logical k in a sub-tile, the physical bit it moves: ``order()`` is
    exactly that bit permutation (checked here, since the kernel computes it bit by bit)."""
    from runtime.kernels.int_gemm_gluon import order
    o = order()
    bits = tuple(o[1 << b].bit_length() - 1 for b in range(7))
    assert all(o[k] == sum(1 << bits[b] for b in range(7) if k >> b & 1) for k in range(128))
    return bits


@triton.jit
def _permute_k(x_ptr, out_ptr, K, stride_xm, B0: tl.constexpr, B1: tl.constexpr,
               B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr, B5: tl.constexpr,
               B6: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    i = offs & 127
    src = ((offs - i) | ((i & 1) << B0) | (((i >> 1) & 1) << B1) | (((i >> 2) & 1) << B2)
           | (((i >> 3) & 1) << B3) | (((i >> 4) & 1) << B4) | (((i >> 5) & 1) << B5)
           | (((i >> 6) & 1) << B6))
    mask = offs < K
    v = tl.load(x_ptr + m * stride_xm + src, mask=mask)
    tl.store(out_ptr + m * K + offs, v, mask=mask)


def permute_k(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (CUDA, unit stride along K, K a multiple of 128) -> a contiguous copy in the K
    order; ``out``: where to write it."""
    M, K = x.shape
    assert x.stride(1) == 1 and K % 128 == 0, "x: unit stride along K, K a multiple of 128"
    out = torch.empty(M, K, device=x.device, dtype=x.dtype) if out is None else out
    BLOCK = 1024
    _permute_k[(M, triton.cdiv(K, BLOCK))](x, out, K, x.stride(0), *order_bits(), BLOCK=BLOCK,
                                          num_warps=4)
    return out
