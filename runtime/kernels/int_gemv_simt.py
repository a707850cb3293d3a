"""Decode GEMV for M = 1..4 on the CUDA cores: ``out [M, N] = x [M, K] @ W.T``, W in the ``int``
format with 2, 4 or 8 bits (3-bit is left to ``int_gemv``).

The tensor-core GEMV (``int_gemv``) must put the unpacked codes back in K order for ``tl.dot``;
at M <= 4 a plain multiply-add needs no reordering at all. Code j of every int32 word of a row
tile is one shift + mask away (``(w >> BITS*j) & MASK``), and it multiplies the activations at
K positions ``word*CPW + j``, loaded with stride CPW (x is a few KB and stays in L1). Codes
become floats through the mantissa trick (``code | 0x4B000000`` is the float32 ``2**23 + code``),
and the zero and scale are applied once per group and row, after the sum:

    sum_k (q_k - z) * s * x_k = s * (sum_k q_k x_k - z * sum_k x_k)     (+ m * sum_k x_k for mins)

Each program owns BLOCK_N rows and a 1/SPLIT_K slice of K (SPLIT_K > 1 writes float32 partial
sums that the launcher adds in a fixed order): small N needs the split to fill every SM.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)      # bits of float32 2**23
MAGIC_F = tl.constexpr(8388608.0)     # 2**23


@triton.jit
def _codes(w, J: tl.constexpr, BITS: tl.constexpr):
    """Code J of every word of ``w`` as exact float32 values 0 .. 2**BITS - 1."""
    c = ((w >> (BITS * J)) & ((1 << BITS) - 1)) | MAGIC
    return c.to(tl.float32, bitcast=True) - MAGIC_F


@triton.jit
def _int_gemv_simt_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, stride_xm, stride_om,
                          stride_qw, BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          SPLIT_K: tl.constexpr):
    CPW: tl.constexpr = 32 // BITS                       # codes per int32 word
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    NSUB: tl.constexpr = BLOCK_K // SUBK
    WPS: tl.constexpr = SUBK // CPW                      # words per row per sub-tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N                                    # clamp: loads stay in bounds
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    iw = tl.arange(0, WPS)
    k_len = K // SPLIT_K
    k_lo = pid_k * k_len
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_len, BLOCK_K):
        for sub in tl.static_range(NSUB):
            ks = k0 + sub * SUBK
            w = tl.load(qw_ptr + rows[:, None] * stride_qw + (ks // CPW + iw)[None, :])  # [BN, WPS]
            xk = x_ptr + offs_m[:, None] * stride_xm + ks + iw[None, :] * CPW           # [BM, WPS]
            part = tl.zeros([BLOCK_N, BLOCK_M, WPS], dtype=tl.float32)
            xs = tl.zeros([BLOCK_M, WPS], dtype=tl.float32)
            for j in tl.static_range(CPW):
                xj = tl.load(xk + j, mask=m_ok[:, None], other=0.0).to(tl.float32)
                part += _codes(w, j, BITS)[:, None, :] * xj[None, :, :]
                xs += xj
            dot = tl.sum(part, axis=2)                                         # [BN, BM]
            xsum = tl.sum(xs, axis=1)                                          # [BM]
            gidx = rows * G + ks // GROUP
            s = tl.load(s_ptr + gidx).to(tl.float32)
            if MODE == 1:
                z = tl.load(z_ptr + gidx).to(tl.float32)
                acc += s[:, None] * (dot - z[:, None] * xsum[None, :])
            elif MODE == 2:
                mn = tl.load(z_ptr + gidx).to(tl.float32)
                acc += s[:, None] * dot + mn[:, None] * xsum[None, :]
            else:
                acc += s[:, None] * (dot - (1 << (BITS - 1)) * xsum[None, :])
    # SPLIT_K > 1: partial sums go to slice pid_k of a [SPLIT_K, M, N] float32 buffer, summed
    # afterwards in a fixed order (atomics would make results vary from run to run)
    o_ptrs = out_ptr + pid_k * M * stride_om + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def simt_cfg(bn, bk, sk=1, nw=4, bm=1):
    """A config of this kernel (``SIMT`` marks it for ``int_gemv.launch``)."""
    return {"SIMT": True, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk,
            "num_warps": nw, "num_stages": 1}


def simt_candidates(M: int, bits: int) -> list[dict]:
    """Configs for the M bucket (none past M = 4, nor for 3-bit codes)."""
    if M > 4 or bits == 3:
        return []
    return [simt_cfg(bn, bk, sk, nw, M) for bn, bk, sk, nw in
            ((16, 256, 1, 4), (64, 256, 4, 4), (128, 64, 1, 4), (128, 64, 2, 4), (256, 64, 1, 8),
             (256, 64, 2, 8), (128, 128, 2, 4))]

def simt_valid(cfg: dict, M: int, K: int, bits: int, group: int) -> bool:
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    subk = min(bk, group)
    return (bits != 3 and cfg["BLOCK_M"] >= M and not K % (bk * sk) and not group % subk
            and not bk % subk and subk % (32 // bits) == 0 and subk >= 32 // bits)


def simt_launch(x, qw, scales, zt, dst, N, K, g, mode, bits, cfg):
    """Run one config into ``dst`` (``[M, N]``; float32 and zeroed when SPLIT_K > 1)."""
    M = x.shape[0]
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    _int_gemv_simt_kernel[grid](
        x, qw, scales, zt, dst, M, N, K, K // g, x.stride(0), dst.stride(-2), K * bits // 32,
        BITS=bits, GROUP=g, MODE=mode, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_M=cfg["BLOCK_M"], SPLIT_K=cfg["SPLIT_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return dst

