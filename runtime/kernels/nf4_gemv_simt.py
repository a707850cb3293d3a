"""Decode GEMV for M = 1..4 on the CUDA cores with nf4 / fp4 weights (bitsandbytes layout):
``out [M, N] = x [M, K] @ W.T``, ``W[n, k] = CODE[q_nk] * absmax[n, k // g]``.

The tensor-core kernel (``nf4_gemv``) builds a dequantized tile for ``tl.dot`` through a
256-entry byte table in global memory: one gather per weight byte over 1 KiB, whose 32 lanes
touch up to 8 cache lines at once. Here nothing is dequantized. Code j of every int32 word of a
row tile (byte j // 2, high nibble first: K position ``8 * word + j``) becomes its exact float32
table value and multiplies the activations at that K position; the absmax of the code's block
is applied once per (row, word), after the sum over the word's 8 codes:

    out[m, n] = sum_b absmax[n, b] * sum_{k in b} CODE[q_nk] * x[m, k]

all in float32 (x converted exactly, rounded once at the end: at least as close to the float32
truth as the reference, which rounds W to x's dtype first). 16-bit x is loaded as int32 pairs
(4 loads per word and row of x), x being a few KB that stay in L1.

The lookup is a warp shuffle. Every lane holds the table value of its lane number mod 16 in a
register, built from immediates inside the inline asm (it depends on nothing but %laneid, so
ptxas hoists it out of the loop, and no layout conversion can move it to another lane), and a
code reads lane ``code`` of its half-warp: ``shfl.sync.idx`` with segment mask 16 ignores the
bits above the nibble, so ``word >> shift`` needs no AND. One shift, one shuffle and M
multiply-adds per code (sm90 SASS of the M = 1 loop: ~3.5 instructions per code, ~5 at M = 2,
~9 at M = 4), no shared or global memory, no bank conflicts, no barrier. The CPU interpreter
has no inline asm: it reads the same 16 float32 values from a table in memory.

Each program owns BLOCK_N rows and a 1/SPLIT_K slice of K, in tiles of BLOCK_K; partial sums
stay per (row, word) until the end and are reduced once. SPLIT_K > 1 writes float32 partial
sums that a second small kernel adds in a fixed order (deterministic).
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from runtime.kernels.reference import FP4_CODE, NF4_CODE
from runtime.kernels.splitk import finish_tile, fused_counters, partials
from runtime.kernels.tl_dequant import nf4_absmax_fin, nf4_absmax_raw


def _bits(v: float) -> str:
    return f"0x{struct.unpack('<I', struct.pack('<f', v))[0]:08x}"


def _shfl_asm(table) -> str:
    """PTX: outputs $0..$7 = table values (bits) of codes 0..7 (K order) of the word $8."""
    t = [_bits(v) for v in table]
    lines = ["{", ".reg .b32 ln, s, e<15>;", ".reg .pred p<4>;", "mov.u32 ln, %laneid;"]
    for b in range(4):
        lines.append(f"and.b32 s, ln, {1 << b};")
        lines.append(f"setp.ne.b32 p{b}, s, 0;")
    for i in range(8):                                   # e[i] = T[lane & 1 | 2i]
        lines.append(f"selp.b32 e{i}, {t[2 * i + 1]}, {t[2 * i]}, p0;")
    for i in range(4):
        lines.append(f"selp.b32 e{8 + i}, e{2 * i + 1}, e{2 * i}, p1;")
    lines.append("selp.b32 e12, e9, e8, p2;")
    lines.append("selp.b32 e13, e11, e10, p2;")
    lines.append("selp.b32 e14, e13, e12, p3;")           # T[lane & 15]
    for j in range(8):
        sh = 8 * (j // 2) + (4 if j % 2 == 0 else 0)     # high nibble first
        src = "$8"
        if sh:
            lines.append(f"shr.u32 s, $8, {sh};")
            src = "s"
        lines.append(f"shfl.sync.idx.b32 ${j}, e14, {src}, 0x100f, 0xffffffff;")
    lines.append("}")
    return "\n".join(lines)


SHFL_ASM = {"nf4": _shfl_asm(NF4_CODE), "fp4": _shfl_asm(FP4_CODE)}


@triton.constexpr_function
def _asm_of(FMT):
    return SHFL_ASM[FMT]


@triton.jit
def _code(w, SH: tl.constexpr, lut_ptr):
    return tl.load(lut_ptr + ((w >> SH) & 15))


@triton.jit
def _values8(w, lut_ptr, FMT: tl.constexpr, INTERP: tl.constexpr):
    """Float32 table values of codes 0..7 (K order) of every word of ``w``."""
    if INTERP:
        return (_code(w, 4, lut_ptr), _code(w, 0, lut_ptr), _code(w, 12, lut_ptr),
                _code(w, 8, lut_ptr), _code(w, 20, lut_ptr), _code(w, 16, lut_ptr),
                _code(w, 28, lut_ptr), _code(w, 24, lut_ptr))
    else:
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _asm_of(FMT), "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.int32,) * 8,
            is_pure=True, pack=1)
        return (c0.to(tl.float32, bitcast=True), c1.to(tl.float32, bitcast=True),
                c2.to(tl.float32, bitcast=True), c3.to(tl.float32, bitcast=True),
                c4.to(tl.float32, bitcast=True), c5.to(tl.float32, bitcast=True),
                c6.to(tl.float32, bitcast=True), c7.to(tl.float32, bitcast=True))


@triton.jit
def _lo(r, DT: tl.constexpr):
    """The 16-bit value in the low half of every int32 of ``r`` (DT bits) as float32."""
    if DT == tl.bfloat16:
        return (r << 16).to(tl.float32, bitcast=True)
    else:
        return r.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _hi(r, DT: tl.constexpr):
    if DT == tl.bfloat16:
        return (r & -65536).to(tl.float32, bitcast=True)
    else:
        return (r >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dot8(v0, v1, v2, v3, v4, v5, v6, v7, x_ptr, ks, iw, ok):
    """sum_j v_j * x[ks + 8*iw + j] over the 8 codes of each word (iw: word index in the tile).

    16-bit x is read as int32 pairs (4 loads per word instead of 8); ``ok`` (shaped as iw):
    this x row exists.
    """
    DT: tl.constexpr = x_ptr.dtype.element_ty
    if DT == tl.float32:
        xp = x_ptr + ks + iw * 8
        part = v0 * tl.load(xp, mask=ok, other=0.0)
        part += v1 * tl.load(xp + 1, mask=ok, other=0.0)
        part += v2 * tl.load(xp + 2, mask=ok, other=0.0)
        part += v3 * tl.load(xp + 3, mask=ok, other=0.0)
        part += v4 * tl.load(xp + 4, mask=ok, other=0.0)
        part += v5 * tl.load(xp + 5, mask=ok, other=0.0)
        part += v6 * tl.load(xp + 6, mask=ok, other=0.0)
        part += v7 * tl.load(xp + 7, mask=ok, other=0.0)
    else:
        xp = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + ks // 2 + iw * 4
        r = tl.load(xp, mask=ok, other=0)
        part = v0 * _lo(r, DT)
        part += v1 * _hi(r, DT)
        r = tl.load(xp + 1, mask=ok, other=0)
        part += v2 * _lo(r, DT)
        part += v3 * _hi(r, DT)
        r = tl.load(xp + 2, mask=ok, other=0)
        part += v4 * _lo(r, DT)
        part += v5 * _hi(r, DT)
        r = tl.load(xp + 3, mask=ok, other=0)
        part += v6 * _lo(r, DT)
        part += v7 * _hi(r, DT)
    return part


@triton.jit
def _store_row(out_ptr, acc, m, M, offs_n, N, pid_k, stride_om):
    """Row m of the result: the sum of ``acc`` over word columns (partial sums when split)."""
    o_ptrs = out_ptr + pid_k * M * stride_om + m * stride_om + offs_n
    res = tl.sum(acc, axis=1)
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=(offs_n < N) & (offs_n * 0 + m < M))


@triton.jit
def _tile_blocks(rows, k0, G, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Flat absmax index of the blocks of the tile at K offset k0: [BN], or [BN, blocks] when the
    tile spans several blocks."""
    if BLOCK_K <= GROUP:
        return rows * G + k0 // GROUP
    else:
        return rows[:, None] * G + k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)[None, :]


@triton.jit
def _tile_absmax(r0, r1, dmap_ptr, off_ptr, DQ: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """absmax of every (row, word) of a tile from its ``nf4_absmax_raw`` data: [BN, 1] when the
    tile lies in one block, else [BN, BLOCK_K // 8], each block's value repeated over its
    GROUP // 8 words. Loaded per block, a broadcast and reshape move only these few values into
    the tile's layout (one load per word instead made the absmax load pick the layout on
    triton 3.6, and every code value was moved instead)."""
    a = nf4_absmax_fin(r0, r1, dmap_ptr, off_ptr, DQ)
    if BLOCK_K <= GROUP:
        return a[:, None]
    else:
        NB: tl.constexpr = BLOCK_K // GROUP
        a = tl.broadcast_to(a[:, :, None], [BLOCK_N, NB, GROUP // 8])
        return tl.reshape(a, [BLOCK_N, BLOCK_K // 8])


@triton.jit
def _nf4_gemv_simt_kernel(x_ptr, qw_ptr, a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, lut_ptr, out_ptr,
                          fin_ptr, cnt_ptr, M, N, K, G, stride_xm, stride_om, stride_fin,
                          GROUP: tl.constexpr, DQ: tl.constexpr,
                          FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr,
                          INTERP: tl.constexpr, FIXUP: tl.constexpr):
    WT: tl.constexpr = BLOCK_K // 8                              # words per row of a tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N                                            # clamp: loads stay in bounds
    iw = tl.arange(0, WT)[None, :]                               # [1, WT]
    k_lo = pid_k * (K // SPLIT_K)                                # K % (BLOCK_K * SPLIT_K) == 0
    k_hi = k_lo + K // SPLIT_K
    w_row = qw_ptr + rows[:, None] * (K // 8) + iw               # [BN, WT]
    # one accumulator per activation row (BLOCK_M <= 4), each [BN, WT]: no M axis in the
    # layouts, so the x values of a word column are loaded once per thread and never moved
    acc0 = tl.zeros([BLOCK_N, WT], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, WT], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, WT], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, WT], dtype=tl.float32)
    if PREFETCH:    # the next tile's loads are issued before this tile's arithmetic
        w = tl.load(w_row + tl.multiple_of(k_lo // 8, WT))
        r0, r1 = nf4_absmax_raw(a_ptr, aq_ptr, a2_ptr,
                                _tile_blocks(rows, k_lo, G, GROUP, BLOCK_K), DQ)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if PREFETCH:
            kn = tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)        # past the end: the last again
            w_n = tl.load(w_row + tl.multiple_of(kn // 8, WT))
            r0_n, r1_n = nf4_absmax_raw(a_ptr, aq_ptr, a2_ptr,
                                        _tile_blocks(rows, kn, G, GROUP, BLOCK_K), DQ)
        else:
            w = tl.load(w_row + tl.multiple_of(k0 // 8, WT))                       # [BN, WT]
            r0, r1 = nf4_absmax_raw(a_ptr, aq_ptr, a2_ptr,
                                    _tile_blocks(rows, k0, G, GROUP, BLOCK_K), DQ)
        v0, v1, v2, v3, v4, v5, v6, v7 = _values8(w, lut_ptr, FMT, INTERP)
        A = _tile_absmax(r0, r1, dmap_ptr, off_ptr, DQ, GROUP, BLOCK_N, BLOCK_K)
        acc0 += A * _dot8(v0, v1, v2, v3, v4, v5, v6, v7, x_ptr, k0, iw, iw * 0 < M)
        if BLOCK_M > 1:
            acc1 += A * _dot8(v0, v1, v2, v3, v4, v5, v6, v7, x_ptr + stride_xm, k0, iw,
                              iw * 0 + 1 < M)
        if BLOCK_M > 2:
            acc2 += A * _dot8(v0, v1, v2, v3, v4, v5, v6, v7, x_ptr + 2 * stride_xm, k0, iw,
                              iw * 0 + 2 < M)
            acc3 += A * _dot8(v0, v1, v2, v3, v4, v5, v6, v7, x_ptr + 3 * stride_xm, k0, iw,
                              iw * 0 + 3 < M)
        if PREFETCH:
            w = w_n
            r0 = r0_n
            r1 = r1_n
    # SPLIT_K > 1: partial sums go to slice pid_k of a [SPLIT_K, M, N] float32 buffer, summed
    # afterwards in a fixed order, or (FIXUP) by the tile's last program into fin
    if FIXUP:
        if BLOCK_M == 1:
            res = tl.sum(acc0, axis=1)[:, None]
        elif BLOCK_M == 2:
            res = tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1))
        else:                                    # columns in row order 0, 1, 2, 3
            res = tl.reshape(tl.join(tl.join(tl.sum(acc0, axis=1), tl.sum(acc2, axis=1)),
                                     tl.join(tl.sum(acc1, axis=1), tl.sum(acc3, axis=1))),
                             [BLOCK_N, 4])
        finish_tile(res, out_ptr, cnt_ptr, fin_ptr, pid_n, pid_k, tl.arange(0, BLOCK_M), offs_n,
                    M, N, stride_fin, SPLIT_K)
    else:
        _store_row(out_ptr, acc0, 0, M, offs_n, N, pid_k, stride_om)
        if BLOCK_M > 1:
            _store_row(out_ptr, acc1, 1, M, offs_n, N, pid_k, stride_om)
        if BLOCK_M > 2:
            _store_row(out_ptr, acc2, 2, M, offs_n, N, pid_k, stride_om)
            _store_row(out_ptr, acc3, 3, M, offs_n, N, pid_k, stride_om)


@triton.jit
def _sum_split_kernel(p_ptr, out_ptr, M, N, stride_om, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, :] = sum over s = 0, 1, .. of the float32 partials p[s, m, :], in that order."""
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.load(p_ptr + m * N + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(p_ptr + (s * M + m) * N + offs, mask=ok, other=0.0)
    tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def simt_cfg(bn, bk, sk=1, nw=4, bm=1, pf=False, fix=0):
    """A config of this kernel (``SIMT`` marks it for ``nf4_gemv.launch``; PREFETCH: load the
    next tile before the arithmetic on this one; FIXUP: split-K partials added in the kernel)."""
    return {"SIMT": True, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk,
            "PREFETCH": pf, "FIXUP": fix, "num_warps": nw, "num_stages": 1}


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, PREFETCH) per M bucket. A thread holds 2 adjacent words
# of BLOCK_N * BLOCK_K / (256 * num_warps) rows: 128 codes per tile for M <= 2 (80 registers at
# M = 1, 128 at M = 2 and with PREFETCH at M = 1), 64 for M = 4 (~128). BLOCK_K <= 512: wider
# tiles made triton move every code value between layouts. SPLIT_K and PREFETCH trade against
# each other for bytes in flight on small grids.
_CANDIDATES = {
    1: ((64, 256, 1, 4, False), (64, 256, 2, 4, False), (64, 256, 4, 4, False),
        (64, 256, 8, 4, False), (32, 256, 8, 2, False), (32, 512, 1, 4, False),
        (128, 128, 1, 4, False), (64, 256, 1, 4, True), (64, 256, 2, 4, True),
        (32, 512, 1, 4, True)),
    2: ((64, 256, 1, 4, False), (64, 256, 2, 4, False), (64, 256, 4, 4, False),
        (64, 256, 8, 4, False), (32, 256, 8, 2, False), (32, 512, 1, 4, False),
        (128, 128, 1, 4, False), (128, 256, 2, 8, False)),
    4: ((32, 256, 1, 4, False), (32, 256, 2, 4, False), (32, 256, 4, 4, False),
        (32, 256, 8, 4, False), (16, 256, 8, 2, False), (64, 256, 2, 8, False),
        (16, 512, 1, 4, False), (64, 128, 1, 4, False), (32, 256, 1, 4, True))}


def simt_candidates(M: int) -> list[dict]:
    """Configs for the M bucket (1, 2 or 4; none past M = 4)."""
    if M > 4:
        return []
    bm = 1 if M <= 1 else 2 if M == 2 else 4
    # split configs add their partials in the kernel (FIXUP; the int GEMV's twins measured it
    # faster or level on 10 of 12 shapes x M, H100 2026-11-26)
    return [simt_cfg(bn, bk, sk, nw, bm, pf, fix=int(sk > 1)) for bn, bk, sk, nw, pf in _CANDIDATES[bm]]


def simt_valid(cfg: dict, M: int, K: int, group: int) -> bool:
    """Whether the config tiles this problem: K in whole tiles per split, and a tile inside one
    block, or made of whole blocks of a power of two of at least 8 codes (tensor shapes)."""
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    if not M <= cfg["BLOCK_M"] <= 4 or K % (bk * sk) or bk % 16:
        return False
    if bk <= group:
        return group % bk == 0
    return bk % group == 0 and group >= 8 and group & (group - 1) == 0


def simt_gemv(x, qw, absmax, lut, out, N, K, g, fmt, dq, interp, cfg):
    """Run one config: ``out [M, N] = x @ W.T``; returns out.

    absmax: the (absmax, absmax_q, absmax2, dynamic map, offset) pointers (tl_dequant's
    ``nf4_absmax_raw`` / ``nf4_absmax_fin``);
    lut: the 16 float32 code values (read by the CPU interpreter only). SPLIT_K > 1 adds the
    float32 partial sums in a fixed order in a second small kernel, or (FIXUP) in this one.
    """
    M = x.shape[0]
    if x.dtype != torch.float32 and ((M > 1 and x.stride(0) % 2) or x.data_ptr() % 4):
        x = x.clone(memory_format=torch.contiguous_format)   # 16-bit x is read as int32 pairs
    sk = cfg["SPLIT_K"]
    dst = partials(out, sk)
    cnt = fused_counters(cfg, x.device, triton.cdiv(N, cfg["BLOCK_N"]))
    _nf4_gemv_simt_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), sk)](
        x, qw, *absmax, lut, dst, out if cnt is not None else dst, dst if cnt is None else cnt,
        M, N, K, K // g, x.stride(0), dst.stride(-2), out.stride(0),
        GROUP=g, DQ=dq, FMT=fmt, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_M=cfg["BLOCK_M"], SPLIT_K=sk, PREFETCH=cfg["PREFETCH"], INTERP=interp,
        FIXUP=cnt is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if sk > 1 and cnt is None:
        _sum_split_kernel[(triton.cdiv(N, 1024), M)](dst, out, M, N, out.stride(0), SPLIT_K=sk,
                                                      BLOCK=1024, num_warps=4)
    return out
