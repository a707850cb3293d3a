"""Decode GEMV on the tensor cores, one ``tl.dot`` per code plane: ``out [M, N] = x [M, K] @ W.T``.

A candidate of ``int_gemv`` (configs with ``PLANES``), for the int format at 2, 4 and 8 bits;
offered to the tuner only with ``EXA_GEMV_PLANES=1`` (``planes_on``), and then used only where its
output agrees with the established tensor-core kernel's (``int_gemv._agrees_with_tc``, the
tuner's check). Measured on an H100 (benchmarks/RESULTS.md, 2026-11-27): correct, but the tuner
never kept it at M = 2-16 on the Llama shapes, so it stays off by default.
``int_gemv``'s tensor-core kernel unpacks the CPW codes of every int32 word into planes and
joins them back into one [BN, BK] tile for a single dot; the join reorders registers, so the
compiler cannot produce the dot's operand layout straight from the load. Here each plane stays
a dot operand of its own: plane i of the word tile ``w [BN, BW]`` holds columns
``k0 + CPW * j + i`` (j < BW), so

    acc [BN, BM] += dequant(plane_i(w)) [BN, BW] @ x.T[k0 + CPW * j + i, :] [BW, BM]

for i < CPW: CPW dots of depth BW (>= 16) per step, every operation between the word load and
the dots elementwise, and the activation rows gathered with a stride of CPW (x is small). No
repacking: it reads the format's own bytes. Codes become float32 through the 2**23 mantissa
trick (tl_dequant's float32 path), then DT.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from runtime.kernels.tl_dequant import MAGIC, dot_acc, int_group_params

_BITS = (2, 4, 8)


@triton.jit
def _planes_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, stride_xm, stride_om,
                   stride_qw, BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                   SPLIT_K: tl.constexpr, INTERP: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    CPW: tl.constexpr = 32 // BITS                   # codes per int32 word
    BW: tl.constexpr = BLOCK_K // CPW                # words per row and step: the dots' depth
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N                                # clamp: loads stay in bounds
    offs_w = tl.arange(0, BW)
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m[None, :] < M
    k_len = K // SPLIT_K
    k_lo = pid_k * k_len
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_len, BLOCK_K):
        Z, S, MN = int_group_params(s_ptr, z_ptr, rows, k0 // GROUP, G, BITS, MODE, tl.float32)  # [BN, 1]
        w = tl.load(qw_ptr + rows[:, None] * stride_qw + (k0 // CPW + offs_w)[None, :])    # [BN, BW]
        for i in tl.static_range(CPW):
            f = (((w >> (i * BITS)) & MASK) | MAGIC).to(tl.float32, bitcast=True)
            wd = (f - Z) * S
            if MODE == 2:
                wd = wd + MN
            if not INTERP:                           # the interpreter multiplies in float32 (dot_acc)
                wd = wd.to(DT)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (k0 + offs_w * CPW + i)[:, None],
                         mask=m_ok, other=0.0)                                           # [BW, BM]
            acc = dot_acc(wd, xt, acc, INTERP)
    # SPLIT_K > 1: partial sums go to slice pid_k of a [SPLIT_K, M, N] float32 buffer
    o_ptrs = out_ptr + pid_k * M * stride_om + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok & (offs_n[:, None] < N))


def planes_on() -> bool:
    """Whether ``int_gemv`` offers these configs to its tuner: only with ``EXA_GEMV_PLANES=1``
    (on the H100 it never beat the other configs, so the default tuning skips its cost)."""
    return os.environ.get("EXA_GEMV_PLANES", "0") == "1"


def planes_cfg(bn: int, bk: int, sk: int = 1, nw: int = 4, ns: int = 2, bm: int = 16) -> dict:
    return {"PLANES": True, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk,
            "num_warps": nw, "num_stages": ns}


def planes_candidates(bits: int) -> list[dict]:
    """A short list (each is compiled and timed once per key): the dots' depth is 16 words."""
    if bits not in _BITS:
        return []
    bk = 16 * (32 // bits)
    return [planes_cfg(64, bk, sk) for sk in (1, 2, 4, 8)] + \
        [planes_cfg(128, bk, 4), planes_cfg(64, bk, 4, ns=3), planes_cfg(64, bk, 4, ns=1),
         planes_cfg(128, bk, 2, nw=8)]


def planes_valid(cfg: dict, M: int, K: int, bits: int, group: int) -> bool:
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    return (bits in _BITS and bk // (32 // bits) >= 16 and bk <= group and group % bk == 0
            and K % (bk * sk) == 0 and cfg["BLOCK_M"] >= M)


def planes_launch(x, qw, scales, zt, dst, N, K, g, mode, bits, cfg, interp: bool) -> None:
    """Run one config into ``dst`` ([M, N], or [SPLIT_K, M, N] float32 partials)."""
    M = x.shape[0]
    sk = cfg["SPLIT_K"]
    _planes_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), sk)](
        x, qw, scales, zt, dst, M, N, K, K // g, x.stride(0), dst.stride(-2), K * bits // 32,
        BITS=bits, GROUP=g, MODE=mode, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_M=cfg["BLOCK_M"], SPLIT_K=sk, INTERP=interp,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


__all__ = ["planes_candidates", "planes_cfg", "planes_launch", "planes_on", "planes_valid"]
