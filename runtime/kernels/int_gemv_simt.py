"""Decode GEMV for M = 1..8 on the CUDA cores: ``out [M, N] = x [M, K] @ W.T``, W in the ``int``
format with 2, 4 or 8 bits (3-bit is left to ``int_gemv``).

Each thread owns chunks of VEC int32 words (a 128-bit load at VEC 4) in several rows, the lanes
of a warp along K. Code j of every word (a "plane") is multiplied by its activation: one FFMA
per weight in an unbroken chain; zero and scale are applied once per chunk and row after it.
OFFSET ("FADD-free"): the code becomes the float32 C0 + q exactly, without an FADD: 4 bits: one
``prmt`` moves byte i of ``w & 0x0F0F0F0F`` (or of ``(w >> 4) & ..``) under the exponent of 128
(C0 = 128); 2 / 8 bits: shift + and/or to bit 20 under 8 / bit 15 under 256. Then

    sum_k (q_k - z) * s * x_k = s * (sum_k (C0 + q_k) x_k - (C0 + z) * sum_k x_k)

(MODE 0 symmetric: z = 2**(BITS-1); MODE 2, ``q * s + m``: z = 0, plus ``m * sum_k x_k``); float32
keeps it tight (C0 <= ~30 |q - z|: relative error ~2e-6). Without OFFSET the float is 2**23 + q
minus 2**23 + z (one FADD per code; exact, and no sum of x except for MODE 2).

Layouts (triton picks them; these choices keep every thread's data in its registers, no shared
memory in the K loop, on triton 3.6 and 3.9): the weights' load decides; x is read as int64
words (4 bf16/fp16 or 2 fp32) in a tile smaller than the thread count, which triton reloads in
the weights' layout (16-byte vectors); the sum of x rides in the dot's reduction (one consumer);
scales and zeros come from a flat tensor, loaded before the weights (see ``_fetch``).

XJOIN (the M > 1 path): x rows are loaded apart (``_xrows``: each tile below the thread count
whatever BLOCK_M) and each activation is converted to float32 (and summed) once per thread,
then joined over the rows in registers (``_xjoin``) and shared by the thread's R weight rows;
one FFMA chain per (weight row, x row) runs through all its words. Per weight: ~1.4 (unpack) +
M FFMA + 2 M / R (convert, sum x) + ~0.1 M (zero, scale) instructions. Without it x's tile of
all BLOCK_M rows must stay below the thread count, which leaves one or two rows per thread:
conversions and sums of x then cost ~2 M a weight (M = 4: 16 instructions, not 7.3).

Grid: a tile is BLOCK_N rows x a 1/SPLIT_K slice of K (SPLIT_K > 1 writes float32 partial sums
that the launcher adds in a fixed order: deterministic, no atomics). PERSIST > 0 launches
PERSIST programs per SM looping over the tiles, else one program per tile. PREFETCH keeps the
next K step's loads in flight (registers) while one computes; EVICT makes the weight loads
evict-first (read once; x, scales and zeros, whose sectors serve several K steps, stay cached).
num_stages is passed on to triton (its pipeliner leaves these loads alone in 3.6 and 3.9).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from runtime.kernels.splitk import finish_tile

MAGIC = tl.constexpr(0x4B000000)      # bits of float32 2**23
MAGIC_F = tl.constexpr(8388608.0)     # 2**23


@triton.constexpr_function
def _prmt(i):
    """Byte i of $2 to bits 16..23 under byte 3 of $1 (0x43000000; a register, not the selector)."""
    return "prmt.b32 $0, $1, $2, " + hex(0x3000 | ((4 + i) << 8)) + ";"


@triton.jit
def _plane(w, J: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr, ASM: tl.constexpr):
    """Code J of every word of ``w`` as float32: C0 + q (OFFSET) or 2**23 + q."""
    if OFFSET and BITS == 4:                             # byte J//2 of w or w >> 4, masked
        src = (w >> (4 * (J % 2))) & 0x0F0F0F0F
        if ASM:
            return tl.inline_asm_elementwise(_prmt(J // 2), "=r,r,r",
                                             [tl.full(src.shape, 0x43000000, tl.int32), src],
                                             dtype=tl.int32, is_pure=True, pack=1
                                             ).to(tl.float32, bitcast=True)
        else:
            return ((((src >> (8 * (J // 2))) & 255) << 16) | 0x43000000).to(tl.float32,
                                                                              bitcast=True)
    elif OFFSET:                                         # shift code J to bit P, and/or
        P: tl.constexpr = 15 if BITS == 8 else 20
        SH: tl.constexpr = P - BITS * J
        v = w << SH if SH > 0 else w >> (-SH)
        return ((v & (((1 << BITS) - 1) << P)) | ((150 - P) << 23)).to(tl.float32, bitcast=True)
    else:
        return (((w >> (BITS * J)) & ((1 << BITS) - 1)) | MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _pick(t, I: tl.constexpr, NI: tl.constexpr):
    """t[..., I] of t [..., NI] (tl.split halves by the lowest index bit)."""
    if NI == 1:
        return tl.reshape(t, t.shape[:-1])
    else:
        a, b = tl.split(tl.reshape(t, t.shape[:-1] + [NI // 2, 2]))
        return _pick(b if I % 2 else a, I // 2, NI // 2)


@triton.jit
def _xcode(v, S: tl.constexpr, XKIND: tl.constexpr):
    """Activation S of the int64 words v as float32 (XKIND 0 bf16 / 1 fp16: four a word, 2
    fp32: two)."""
    XPW: tl.constexpr = 2 if XKIND == 2 else 4
    h = (v >> 32).to(tl.int32) if S * (64 // XPW) >= 32 else v.to(tl.int32)
    if XKIND == 2:
        return h.to(tl.float32, bitcast=True)
    elif XKIND == 1:
        return (h >> (16 * (S % 2))).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    elif S % 2 == 0:
        return (h << 16).to(tl.float32, bitcast=True)
    else:
        return (h & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _xval(xt, J: tl.constexpr, CPW: tl.constexpr, XKIND: tl.constexpr):
    """Activation of code J of every word, float32, from the int64 tile xt [1, BM, T, VEC, NI]."""
    XPW: tl.constexpr = 2 if XKIND == 2 else 4
    return _xcode(_pick(xt, J // XPW, CPW // XPW), J % XPW, XKIND)


@triton.jit
def _xrows(x_ptrs, m0: tl.constexpr, STEP: tl.constexpr, NM: tl.constexpr, M, stride_xm,
           SHAPE: tl.constexpr):
    """XJOIN: a tuple of the x words of rows m0, m0 + STEP, .. (NM of them; past M the last),
    one load each: each tile stays below the thread count whatever BLOCK_M is."""
    if NM == 1:
        return (tl.reshape(tl.load(x_ptrs + tl.minimum(M - 1, m0) * stride_xm), SHAPE),)
    else:
        return _xrows(x_ptrs, m0, STEP, NM // 2, M, stride_xm, SHAPE) + \
            _xrows(x_ptrs, m0 + STEP * (NM // 2), STEP, NM // 2, M, stride_xm, SHAPE)


@triton.jit
def _xjoin(xt, V: tl.constexpr, J: tl.constexpr, m0: tl.constexpr, STEP: tl.constexpr,
           NM: tl.constexpr, VEC: tl.constexpr, NI: tl.constexpr, XKIND: tl.constexpr):
    """XJOIN: activation of code J of word V of rows m0 + i * STEP (xt[m] [1, 1, T, VEC, NI]),
    float32 [1, 1, T, NM]: converted once, joined in registers (even rows, then odd ones)."""
    XPW: tl.constexpr = 2 if XKIND == 2 else 4
    if NM == 1:
        return _xcode(_pick(_pick(xt[m0], J // XPW, NI), V, VEC), J % XPW, XKIND)[:, :, :, None]
    else:
        a = _xjoin(xt, V, J, m0, 2 * STEP, NM // 2, VEC, NI, XKIND)
        b = _xjoin(xt, V, J, m0 + STEP, 2 * STEP, NM // 2, VEC, NI, XKIND)
        return tl.reshape(tl.join(a, b), a.shape[:-1] + [NM])


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _fetch(i, s_ptr, z_ptr, x_ptrs, w_ptrs, g_row, g_k, M, stride_xm, MODE: tl.constexpr,
           BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
           BLOCK_M: tl.constexpr, VEC: tl.constexpr, NI: tl.constexpr, EVP: tl.constexpr,
           XJOIN: tl.constexpr):
    """K step i's scales, zeros (mins; for MODE 0 the scales again), x words (XJOIN: a tuple,
    one [1, 1, T, VEC, NI] tile per row) and weights. The weights come last: triton gives an op
    whose operands have different layouts the one that reached it first, and the last load
    propagates first."""
    T: tl.constexpr = BLOCK_K * BITS // (32 * VEC)
    BW: tl.constexpr = BLOCK_K * BITS // 32
    gi = g_row + (g_k + i * BLOCK_K) // GROUP        # (a sector of scales serves 8-16 steps)
    s = tl.reshape(tl.load(s_ptr + gi).to(tl.float32), [BLOCK_N, 1, T, 1])
    z = s
    if MODE != 0:
        z = tl.reshape(tl.load(z_ptr + gi).to(tl.float32), [BLOCK_N, 1, T, 1])
    if XJOIN:
        xt = _xrows(x_ptrs + i * (BW * NI), 0, 1, BLOCK_M, M, stride_xm, [1, 1, T, VEC, NI])
    else:
        xt = tl.reshape(tl.load(x_ptrs + i * (BW * NI)), [1, BLOCK_M, T, VEC, NI])
    w = tl.reshape(tl.load(w_ptrs + i * BW, eviction_policy=EVP), [BLOCK_N, 1, T, VEC])
    return s, z, xt, w


@triton.jit
def _step(acc, s, z, xt, w, BITS: tl.constexpr, MODE: tl.constexpr, OFFSET: tl.constexpr,
          XKIND: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
          T: tl.constexpr, VEC: tl.constexpr):
    """acc [BN, BM, T, 1] + this K step's products (z: zeros for MODE 1, mins for MODE 2)."""
    CPW: tl.constexpr = 32 // BITS
    XSUM: tl.constexpr = OFFSET or MODE == 2             # sum_k x_k needed
    if not OFFSET:                                       # each code minus 2**23 + z
        zb = z + MAGIC_F if MODE == 1 else MAGIC_F + (1 << (BITS - 1)) * (MODE == 0)
    part = tl.zeros([BLOCK_N, BLOCK_M, T, VEC], dtype=tl.float32)
    xs = tl.zeros([1, BLOCK_M, T, VEC], dtype=tl.float32)
    for j in tl.static_range(CPW):                       # one FFMA chain per (row, word)
        xj = _xval(xt, j, CPW, XKIND)                                              # [1,BM,T,VEC]
        pj = _plane(w, j, BITS, OFFSET, ASM)                                       # [BN,1,T,VEC]
        if not OFFSET:
            pj = pj - zb
        part = tl.fma(pj, xj, part)
        if XSUM:
            xs += xj
    if XSUM:           # sum of x in the dot's reduction: x is then wanted in one layout only
        dot, xsum = tl.reduce((part, tl.broadcast_to(xs, part.shape)), 3, _add2, keep_dims=True)
    else:
        dot = tl.sum(part, axis=3, keep_dims=True)                                # [BN,BM,T,1]
        xsum = dot                                       # (unused: MODE 0 / 1, no OFFSET)
    return _scale(acc, dot, xsum, s, z, BITS, MODE, OFFSET)


@triton.jit
def _scale(acc, dot, xsum, s, z, BITS: tl.constexpr, MODE: tl.constexpr, OFFSET: tl.constexpr):
    """acc + the chunk's dot products, zero point / offset and scale applied."""
    if OFFSET:         # fma with dot as addend: the weights' layout
        C0: tl.constexpr = 128 if BITS == 4 else 8 if BITS == 2 else 256
        zc = z + C0 if MODE == 1 else C0 + (1 << (BITS - 1)) * (MODE == 0)
        dot = tl.fma(xsum, -zc, dot)
    if MODE == 2:
        return acc + tl.fma(z, xsum, s * dot)
    else:
        return acc + s * dot


@triton.jit
def _step_j(acc, s, z, xt, w, BITS: tl.constexpr, MODE: tl.constexpr, OFFSET: tl.constexpr,
            XKIND: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr,
            NI: tl.constexpr):
    """XJOIN: acc [BN, 1, T, BM] + this K step's products: one FFMA chain per (row, x row)
    through all the thread's words; each activation is converted (and summed) once per thread,
    then serves all its rows."""
    CPW: tl.constexpr = 32 // BITS
    XSUM: tl.constexpr = OFFSET or MODE == 2
    if not OFFSET:
        zb = z + MAGIC_F if MODE == 1 else MAGIC_F + (1 << (BITS - 1)) * (MODE == 0)
    part = tl.zeros(acc.shape, dtype=tl.float32)
    xs = tl.zeros([1, 1, acc.shape[2], BLOCK_M], dtype=tl.float32)
    for v in tl.static_range(VEC):
        wv = _pick(w, v, VEC)[:, :, :, None]                                      # [BN,1,T,1]
        for j in tl.static_range(CPW):
            xj = _xjoin(xt, v, j, 0, 1, BLOCK_M, VEC, NI, XKIND)                   # [1,1,T,BM]
            pj = _plane(wv, j, BITS, OFFSET, ASM)
            if not OFFSET:
                pj = pj - zb
            part = tl.fma(pj, xj, part)
            if XSUM:
                xs += xj
    return _scale(acc, part, xs, s, z, BITS, MODE, OFFSET)


@triton.jit
def _int_gemv_simt_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, fin_ptr, cnt_ptr, M, N, K, G,
                          stride_xm, stride_om, stride_fin, stride_qw, BITS: tl.constexpr,
                          GROUP: tl.constexpr, MODE: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                          SPLIT_K: tl.constexpr, VEC: tl.constexpr, OFFSET: tl.constexpr,
                          EVP: tl.constexpr, PERSIST: tl.constexpr, XKIND: tl.constexpr,
                          ASM: tl.constexpr, PREFETCH: tl.constexpr, XJOIN: tl.constexpr,
                          FIXUP: tl.constexpr):
    # data tensors are 4-D [rows n, x rows m, chunks t, words v] (size 1 where unused; XJOIN:
    # [n, 1, t, m]): triton carries a layout into expand_dims only from a slice layout, so
    # nothing is expanded
    CPW: tl.constexpr = 32 // BITS                       # codes per int32 word
    CH: tl.constexpr = VEC * CPW                         # codes per chunk (one thread, one row)
    T: tl.constexpr = BLOCK_K // CH                      # chunks per row per K step
    BW: tl.constexpr = BLOCK_K // CPW                    # words per row per K step
    NI: tl.constexpr = CPW // (2 if XKIND == 2 else 4)   # int64 words of x per weight word
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_len = K // SPLIT_K
    n_k = k_len // BLOCK_K
    step = tl.num_programs(0) if PERSIST else tiles_n * SPLIT_K     # one tile each unless PERSIST
    for tile in range(tl.program_id(0), tiles_n * SPLIT_K, step):
        pid_n = tile % tiles_n
        pid_k = tile // tiles_n
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = (offs_n % N)[:, None, None]               # clamp: loads stay in bounds
        offs_m = (tl.arange(0, BLOCK_M) % M)[None, :, None]      # clamp too: no mask
        if XJOIN:                                        # rows of x apart (_xrows)
            offs_m = tl.zeros([1, 1, 1], dtype=tl.int32)
        kw_lo = tl.multiple_of(pid_k * (k_len // CPW), BW)
        # load pointers are 3-D [n, m, K order] (layouts then follow from contiguity alone;
        # triton versions break ties between equally contiguous dims differently)
        w_ptrs = qw_ptr + rows * stride_qw + kw_lo + tl.arange(0, BW)[None, None, :]
        x_ptrs = x_ptr + offs_m * stride_xm + kw_lo * NI + tl.arange(0, BW * NI)[None, None, :]
        # scales / zeros of chunk (n, t) from a flat [BN * T] tensor: its layout puts
        # consecutive t on consecutive lanes, as the weights' layout does
        g_row = tl.reshape(tl.broadcast_to((offs_n % N)[:, None] * G, [BLOCK_N, T]), [BLOCK_N * T])
        g_k = tl.reshape(tl.broadcast_to(kw_lo * CPW + tl.arange(0, T)[None, :] * CH,
                                         [BLOCK_N, T]), [BLOCK_N * T])
        acc = tl.zeros([BLOCK_N, 1, T, BLOCK_M] if XJOIN else [BLOCK_N, BLOCK_M, T, 1],
                       dtype=tl.float32)
        if PREFETCH:   # registers hold step i + 1's loads while step i computes
            s, z, xt, w = _fetch(0, s_ptr, z_ptr, x_ptrs, w_ptrs, g_row, g_k, M, stride_xm, MODE,
                                 BITS, GROUP, BLOCK_N, BLOCK_K, BLOCK_M, VEC, NI, EVP, XJOIN)
        for i in range(0, n_k):
            if PREFETCH:
                s_i, z_i, xt_i, w_i = s, z, xt, w
                s, z, xt, w = _fetch(tl.minimum(i + 1, n_k - 1), s_ptr, z_ptr, x_ptrs, w_ptrs,
                                     g_row, g_k, M, stride_xm, MODE, BITS, GROUP, BLOCK_N,
                                     BLOCK_K, BLOCK_M, VEC, NI, EVP, XJOIN)
            else:
                s_i, z_i, xt_i, w_i = _fetch(i, s_ptr, z_ptr, x_ptrs, w_ptrs, g_row, g_k, M,
                                             stride_xm, MODE, BITS, GROUP, BLOCK_N, BLOCK_K,
                                             BLOCK_M, VEC, NI, EVP, XJOIN)
            if XJOIN:
                acc = _step_j(acc, s_i, z_i, xt_i, w_i, BITS, MODE, OFFSET, XKIND, ASM, BLOCK_M,
                              VEC, NI)
            else:
                acc = _step(acc, s_i, z_i, xt_i, w_i, BITS, MODE, OFFSET, XKIND, ASM, BLOCK_N,
                            BLOCK_M, T, VEC)
        res = tl.reshape(tl.sum(acc, axis=2), [BLOCK_N, BLOCK_M])
        # SPLIT_K > 1: partial sums go to slice pid_k of a [SPLIT_K, M, N] float32 buffer,
        # summed in a fixed order afterwards, or (FIXUP) by the tile's last program into fin
        if FIXUP:
            finish_tile(res, out_ptr, cnt_ptr, fin_ptr, pid_n, pid_k, tl.arange(0, BLOCK_M),
                        offs_n, M, N, stride_fin, SPLIT_K)
        else:
            on = offs_n[:, None]
            om = tl.arange(0, BLOCK_M)[None, :]
            tl.store(out_ptr + pid_k * M * stride_om + om * stride_om + on,
                     res.to(out_ptr.dtype.element_ty), mask=(om < M) & (on < N))


def simt_cfg(bn, bk, sk=1, nw=4, bm=1, ns=1, vec=4, offset=True, evict=True, persist=0, pf=0,
             join=0, fix=0):
    """A config of this kernel (``SIMT`` marks it for ``int_gemv.launch``)."""
    return {"SIMT": True, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk,
            "VEC": vec, "OFFSET": offset, "EVICT": evict, "PERSIST": persist, "PREFETCH": pf,
            "XJOIN": join, "FIXUP": fix, "num_warps": nw, "num_stages": ns}


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, extra keys) per M bucket. Rows per thread R =
# BLOCK_N * BLOCK_K / (VEC * 32/BITS * 32 * num_warps) share each activation load (and, XJOIN,
# each conversion and sum of x: 2 M / R instructions a weight); x's tile (BLOCK_K / 4 int64
# words, times BLOCK_M unless XJOIN) stays below the thread count, else it goes through shared
# memory (slower, still correct). XJOIN at R = 8 holds 2 R M accumulators (M = 8: ~255
# registers). SPLIT_K / PERSIST size the grid.
_J = {"join": 1}
_CANDIDATES = {
    1: [(64, 256, 1, 4, {}), (64, 256, 2, 4, {}), (64, 256, 4, 4, {}), (128, 256, 1, 4, {}),
        (128, 256, 2, 4, {}), (64, 512, 1, 8, {}), (64, 512, 2, 8, {}), (32, 256, 4, 4, {}),
        (32, 256, 8, 4, {}), (64, 256, 2, 4, {"pf": 1}), (64, 512, 1, 8, {"pf": 1}),
        (32, 256, 4, 4, {"persist": 4}), (64, 256, 2, 4, {"offset": False})],
    2: [(128, 256, 1, 4, _J), (128, 256, 2, 4, _J), (128, 256, 4, 4, _J), (128, 128, 2, 2, _J),
        (128, 64, 4, 1, _J), (64, 256, 2, 4, _J), (128, 256, 2, 4, {"pf": 1, **_J})],
    4: [(128, 256, 1, 4, _J), (128, 256, 2, 4, _J), (128, 256, 4, 4, _J), (128, 128, 2, 2, _J),
        (128, 128, 4, 2, _J), (128, 64, 4, 1, _J), (64, 256, 2, 4, _J),
        (128, 256, 2, 4, {"pf": 1, **_J}), (128, 256, 4, 4, {"pf": 1, **_J}),
        (128, 256, 8, 4, _J)],
}
# M = 8 (BLOCK_M 8 works, tests cover it) is not offered: on an H100 (2026-11-26, gemv_lab) its
# best config took 165-167 us on the 70B shapes vs 106-109 us for the tensor-core GEMV.


def simt_candidates(M: int, bits: int, xbytes: int = 2) -> list[dict]:
    """Configs for the M bucket (none past M = 4, nor for 3-bit codes). XJOIN ones keep R = 8
    (BLOCK_N times 4 / BITS) and, for float32 activations (``xbytes`` 4), x's tile per row below
    the thread count (BLOCK_K halved, BLOCK_N doubled); none where a thread's raw activations
    of one K step would pass 128 registers (32 M xbytes / BITS, twice that with PREFETCH)."""
    if M > 4 or bits == 3:
        return []
    out = []
    for bn, bk, sk, nw, kw in _CANDIDATES[M]:
        if kw.get("join"):
            raw = 32 * M * xbytes // bits * (2 if kw.get("pf") else 1)
            bn, bk = bn * 4 // bits * (xbytes // 2), bk // (xbytes // 2)
            if raw > 128 or bk * bits % 128:             # (a K step of whole chunks)
                continue
        out.append(simt_cfg(bn, bk, sk, nw, bm=M, **kw))
        if sk > 1:                                       # the same, partials summed in-kernel
            out.append(simt_cfg(bn, bk, sk, nw, bm=M, fix=1, **kw))
    return out


def _vec(cfg: dict, bits: int, group: int) -> int:
    """Words per thread chunk: the config's VEC, cut to the words of one group."""
    return max(1, min(cfg.get("VEC", 4), group * bits // 32))


def simt_valid(cfg: dict, M: int, K: int, bits: int, group: int) -> bool:
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    ch = _vec(cfg, bits, group) * 32 // bits
    return (bits != 3 and cfg["BLOCK_M"] >= M and not K % (bk * sk) and not bk % ch
            and not group % ch)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def simt_launch(x, qw, scales, zt, dst, N, K, g, mode, bits, cfg, fin=None, cnt=None):
    """Run one config into ``dst`` (``[M, N]``; float32 ``[SPLIT_K, M, N]`` partials when
    SPLIT_K > 1). With ``fin`` and ``cnt`` (SPLIT_K > 1: the ``[M, N]`` output and
    ``splitk.counters``) the kernel also adds the partials into ``fin`` itself."""
    from runtime.kernels.tuning import interpreting
    M = x.shape[0]
    xpw = 2 if x.dtype == torch.float32 else 4         # x is read as int64 words
    if x.stride(0) % xpw or x.storage_offset() % xpw:
        x = x.contiguous()
    bn, sk, persist = cfg["BLOCK_N"], cfg["SPLIT_K"], cfg.get("PERSIST", 0)
    grid = triton.cdiv(N, bn) * sk
    if persist:
        grid = min(grid, persist * (_sm_count(x.device.index or 0) if x.is_cuda else 4))
    _int_gemv_simt_kernel[(grid,)](
        x.view(torch.int64), qw, scales, zt, dst, dst if fin is None else fin,
        dst if cnt is None else cnt, M, N, K, K // g, x.stride(0) // xpw, dst.stride(-2),
        dst.stride(-2) if fin is None else fin.stride(0), K * bits // 32,
        BITS=bits, GROUP=g, MODE=mode, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"],
        BLOCK_M=cfg["BLOCK_M"], SPLIT_K=sk, VEC=_vec(cfg, bits, g),
        OFFSET=cfg.get("OFFSET", True), EVP="evict_first" if cfg.get("EVICT") else "",
        PERSIST=bool(persist), XKIND={torch.bfloat16: 0, torch.float16: 1}.get(x.dtype, 2),
        ASM=not interpreting(), PREFETCH=bool(cfg.get("PREFETCH", 0)),
        XJOIN=bool(cfg.get("XJOIN", 0)), FIXUP=fin is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dst
