"""Triton device functions shared by the quantized-matmul kernels: packed tile -> float tile.

Layouts are those of ``runtime/quant/spec.py``. Packed ``int`` weights are read as int32 words
(the launchers view the uint8 tensors as int32), so every program loads wide vectors along K.

Codes become floats without the slow int->float convert, by writing them into a float's
mantissa under a fixed exponent:

* 16-bit path (bf16/fp16 tiles, BITS 2 and 4, and 8 for fp16): ``0x3F80 | code << (7 - BITS)``
  is the bf16 ``1 + code / 2**BITS`` (fp16: ``0x3C00 | code << (10 - BITS)``). One shift and one
  AND/OR of an int32 word build the codes of two planes at once (bits SH and SH + 16 land in the
  low and high halves), and ``(v - (1 + z / 2**BITS)) * (s * 2**BITS)`` runs as packed
  two-wide bf16/fp16 instructions. ``v - Z`` is exact; one rounding follows in the multiply.
* float32 path (float32 activations, BITS 3, BITS 8 with bf16): ``code | 0x4B000000`` is the
  float32 ``2**23 + code``; ``(f - (2**23 + z)) * s + m`` in float32, then one cast.

A word holding CPW codes is unpacked into CPW "planes" (code j of every word, each [BN, BW]),
joined back with ``tl.join`` so that the values of one word stay in one thread (no data moves).
PERM orders the K positions inside each word as (code i, code i + CPW/2) pairs, so the two
halves of one int32 register are adjacent K positions and need no repacking before ``tl.dot``;
the activations are then permuted the same way (``perm_x``). Without PERM the order is natural.
"""
import triton
import triton.language as tl

MAGIC = tl.constexpr(0x4B000000)      # bits of float32 2**23
MAGIC_F = tl.constexpr(8388608.0)     # 2**23


@triton.jit
def _join4(c0, c1, c2, c3):
    return tl.join(tl.join(c0, c2), tl.join(c1, c3))


@triton.jit
def _join8(c0, c1, c2, c3, c4, c5, c6, c7):
    return tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)),
                   tl.join(tl.join(c1, c5), tl.join(c3, c7)))


@triton.jit
def _join16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    a0 = tl.join(tl.join(tl.join(c0, c8), tl.join(c4, c12)), tl.join(tl.join(c2, c10), tl.join(c6, c14)))
    a1 = tl.join(tl.join(tl.join(c1, c9), tl.join(c5, c13)), tl.join(tl.join(c3, c11), tl.join(c7, c15)))
    return tl.join(a0, a1)


@triton.jit
def _arrange4(c0, c1, c2, c3, PERM: tl.constexpr):
    if PERM:
        return tl.join(tl.join(c0, c1), tl.join(c2, c3))
    else:
        return _join4(c0, c1, c2, c3)


@triton.jit
def _arrange8(c0, c1, c2, c3, c4, c5, c6, c7, PERM: tl.constexpr):
    if PERM:
        return tl.join(_join4(c0, c1, c2, c3), _join4(c4, c5, c6, c7))
    else:
        return _join8(c0, c1, c2, c3, c4, c5, c6, c7)


@triton.jit
def _arrange16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15,
               PERM: tl.constexpr):
    if PERM:
        return tl.join(_join8(c0, c1, c2, c3, c4, c5, c6, c7),
                       _join8(c8, c9, c10, c11, c12, c13, c14, c15))
    else:
        return _join16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)


@triton.jit
def perm_x(x, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, CPW: tl.constexpr):
    """x.T tile [BLOCK_K, BLOCK_M] in natural K order -> the PERM order of the weight tiles."""
    x4 = tl.reshape(x, [BLOCK_K // CPW, 2, CPW // 2, BLOCK_M])
    return tl.reshape(tl.permute(x4, (0, 2, 1, 3)), [BLOCK_K, BLOCK_M])


@triton.jit
def load_xt(x_ptr, ks, M, stride_xm, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
            CPW: tl.constexpr, PERM: tl.constexpr):
    """x.T tile [BLOCK_K, BLOCK_M] at K offset ks (rows m >= M read as 0), in PERM order."""
    offs_m = tl.arange(0, BLOCK_M)
    if PERM:
        iw = tl.arange(0, BLOCK_K // CPW)
        j = tl.arange(0, CPW)
        ptrs = x_ptr + offs_m[None, None, :] * stride_xm + (ks + iw[:, None, None] * CPW + j[None, :, None])
        x3 = tl.load(ptrs, mask=offs_m[None, None, :] < M, other=0.0)       # [BK/CPW, CPW, BM]
        return perm_x(tl.reshape(x3, [BLOCK_K, BLOCK_M]), BLOCK_K, BLOCK_M, CPW)
    else:
        offs_k = ks + tl.arange(0, BLOCK_K)
        return tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                       mask=offs_m[None, :] < M, other=0.0)


@triton.jit
def _deq(v, Z, S, MN, HAS_MIN: tl.constexpr):
    """(v - Z) * S + MN with Z, S, MN per row ([BN, 1])."""
    if HAS_MIN:
        return (v - Z) * S + MN
    else:
        return (v - Z) * S


@triton.jit
def _f32(w, SH: tl.constexpr, MASK: tl.constexpr, Z, S, MN, HAS_MIN: tl.constexpr):
    """float32 path: plane at bit SH, dequantized."""
    f = (((w >> SH) & MASK) | MAGIC).to(tl.float32, bitcast=True)
    return _deq(f, Z, S, MN, HAS_MIN)


@triton.jit
def _f32_3(lo, hi, J: tl.constexpr, Z, S, MN, HAS_MIN: tl.constexpr):
    """float32 path, 3-bit code J of a 16-code word: low 2 bits from ``lo``, high bit from ``hi``."""
    c = ((lo >> (2 * J)) & 3) | (((hi >> J) & 1) << 2)
    return _deq((c | MAGIC).to(tl.float32, bitcast=True), Z, S, MN, HAS_MIN)


@triton.jit
def _and_or(v, MASK: tl.constexpr, ONE: tl.constexpr, ASM: tl.constexpr):
    """(v & MASK) | ONE; on the GPU as one ``lop3`` (ptxas leaves the and/or pair unfused)."""
    if ASM:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                         [v, tl.full(v.shape, MASK, tl.int32), tl.full(v.shape, ONE, tl.int32)],
                                         dtype=tl.int32, is_pure=True, pack=1)
    else:
        return (v & MASK) | ONE


@triton.jit
def _deq16(v, Z, S, MN, HAS_MIN: tl.constexpr, F32MATH: tl.constexpr):
    """_deq on DT values; F32MATH (the CPU interpreter, whose bf16 arithmetic is integer
    arithmetic on the raw bits) computes in float32: bit-identical, since v - Z is exact and
    the product is exact in float32 before the one rounding to DT."""
    if F32MATH:
        r = _deq(v.to(tl.float32), Z.to(tl.float32), S.to(tl.float32), MN.to(tl.float32), HAS_MIN)
        return r.to(v.dtype)
    else:
        return _deq(v, Z, S, MN, HAS_MIN)


@triton.jit
def _pair16(w, SH: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, Z, S, MN,
            HAS_MIN: tl.constexpr, F32MATH: tl.constexpr, APPLY: tl.constexpr):
    """16-bit path: the planes at bits SH and SH + 16 of ``w`` as two DT tiles: dequantized,
    or the raw ``1 + code / 2**BITS`` unless APPLY."""
    MANT: tl.constexpr = 7 if DT == tl.bfloat16 else 10
    ONE: tl.constexpr = 0x3F803F80 if DT == tl.bfloat16 else 0x3C003C00
    P: tl.constexpr = MANT - BITS                       # where the code goes in each half
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001 << P
    if SH > P:
        v = w >> (SH - P)
    elif SH < P:
        v = w << (P - SH)
    else:
        v = w
    v = _and_or(v, MASK, ONE, not F32MATH)
    lo = v.to(tl.int16).to(DT, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(DT, bitcast=True)
    if APPLY:
        return _deq16(lo, Z, S, MN, HAS_MIN, F32MATH), _deq16(hi, Z, S, MN, HAS_MIN, F32MATH)
    else:
        return lo, hi


@triton.constexpr_function
def pair16(BITS, DT):
    """Whether tiles of BITS-bit codes for DT activations take the 16-bit path."""
    return DT != tl.float32 and (BITS == 2 or BITS == 4 or (BITS == 8 and DT == tl.float16))


@triton.jit
def int_group_params(s_ptr, z_ptr, rows, gi, G, BITS: tl.constexpr, MODE: tl.constexpr,
                     DT: tl.constexpr, EPI: tl.constexpr = False):
    """(Z, S, MN) of group ``gi`` for every row, each [BN, 1], for ``int_tile``.

    MODE 0 symmetric (z = 2**(BITS-1)), 1 uint8 zeros, 2 float16 mins (z = 0). On the 16-bit
    path they are in DT, or in float32 with EPI (applied after the dot instead).
    """
    gidx = rows * G + gi
    s = tl.load(s_ptr + gidx).to(tl.float32)
    if MODE == 1:
        z = tl.load(z_ptr + gidx).to(tl.float32)
    else:
        z = tl.zeros_like(s) + (1 << (BITS - 1)) * (MODE == 0)
    if MODE == 2:
        m = tl.load(z_ptr + gidx).to(tl.float32)
    else:
        m = tl.zeros_like(s)
    if pair16(BITS, DT) and EPI:
        Z = 1.0 + z * (1.0 / (1 << BITS))
        S = s * (1 << BITS)
        MN = m
    elif pair16(BITS, DT):
        Z = (1.0 + z * (1.0 / (1 << BITS))).to(DT)
        S = (s * (1 << BITS)).to(DT)
        MN = m.to(DT)
    else:
        Z = z + MAGIC_F
        S = s
        MN = m
    return Z[:, None], S[:, None], MN[:, None]


@triton.jit
def int_tile(qw_ptr, rows, kw0, stride_qw, K, Z, S, MN,
             BITS: tl.constexpr, MODE: tl.constexpr, DT: tl.constexpr, PERM: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32MATH: tl.constexpr = False,
             APPLY: tl.constexpr = True):
    """Dequantized weight tile [BLOCK_N, BLOCK_K] of the ``int`` format, in dtype DT.

    The tile lies inside one quantization group (Z, S, MN from int_group_params). rows: [BN]
    valid row indices; kw0: index of the tile's first int32 word in its row (a word holds
    32 // BITS codes; for BITS 3 it is the low-plane word of 16 codes); stride_qw: words per
    row. PERM: K positions in pair order (see the module docstring), else natural order.
    F32MATH: do the 16-bit path's arithmetic in float32 (for the CPU interpreter).
    APPLY False (16-bit path only, see ``pair16``): the raw ``1 + code / 2**BITS`` values (for a
    caller that applies zero and scale after the dot: ``S (sum v x - Z sum x) + MN sum x``).
    """
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    BW: tl.constexpr = BLOCK_K // CPW
    HM: tl.constexpr = MODE == 2
    kw = kw0 + tl.arange(0, BW)
    row_w = rows[:, None] * stride_qw                                     # [BN, 1]
    w = tl.load(qw_ptr + row_w + kw[None, :])                             # [BN, BW] int32
    if pair16(BITS, DT):
        if BITS == 8:
            c0, c2 = _pair16(w, 0, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c1, c3 = _pair16(w, 8, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            t = _arrange4(c0, c1, c2, c3, PERM)
        elif BITS == 4:
            c0, c4 = _pair16(w, 0, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c1, c5 = _pair16(w, 4, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c2, c6 = _pair16(w, 8, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c3, c7 = _pair16(w, 12, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            t = _arrange8(c0, c1, c2, c3, c4, c5, c6, c7, PERM)
        else:
            c0, c8 = _pair16(w, 0, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c1, c9 = _pair16(w, 2, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c2, c10 = _pair16(w, 4, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c3, c11 = _pair16(w, 6, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c4, c12 = _pair16(w, 8, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c5, c13 = _pair16(w, 10, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c6, c14 = _pair16(w, 12, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            c7, c15 = _pair16(w, 14, BITS, DT, Z, S, MN, HM, F32MATH, APPLY)
            t = _arrange16(c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, PERM)
    elif BITS == 8:
        t = _arrange4(_f32(w, 0, 255, Z, S, MN, HM), _f32(w, 8, 255, Z, S, MN, HM),
                      _f32(w, 16, 255, Z, S, MN, HM), _f32(w, 24, 255, Z, S, MN, HM), PERM).to(DT)
    elif BITS == 4:
        t = _arrange8(_f32(w, 0, 15, Z, S, MN, HM), _f32(w, 4, 15, Z, S, MN, HM),
                      _f32(w, 8, 15, Z, S, MN, HM), _f32(w, 12, 15, Z, S, MN, HM),
                      _f32(w, 16, 15, Z, S, MN, HM), _f32(w, 20, 15, Z, S, MN, HM),
                      _f32(w, 24, 15, Z, S, MN, HM), _f32(w, 28, 15, Z, S, MN, HM), PERM).to(DT)
    elif BITS == 2:
        t = _arrange16(_f32(w, 0, 3, Z, S, MN, HM), _f32(w, 2, 3, Z, S, MN, HM),
                       _f32(w, 4, 3, Z, S, MN, HM), _f32(w, 6, 3, Z, S, MN, HM),
                       _f32(w, 8, 3, Z, S, MN, HM), _f32(w, 10, 3, Z, S, MN, HM),
                       _f32(w, 12, 3, Z, S, MN, HM), _f32(w, 14, 3, Z, S, MN, HM),
                       _f32(w, 16, 3, Z, S, MN, HM), _f32(w, 18, 3, Z, S, MN, HM),
                       _f32(w, 20, 3, Z, S, MN, HM), _f32(w, 22, 3, Z, S, MN, HM),
                       _f32(w, 24, 3, Z, S, MN, HM), _f32(w, 26, 3, Z, S, MN, HM),
                       _f32(w, 28, 3, Z, S, MN, HM), _f32(w, 30, 3, Z, S, MN, HM), PERM).to(DT)
    else:
        # BITS 3: the high-bit plane starts K/16 words into the row; low-plane word kw pairs with
        # the 16-bit half (kw % 2) of high-plane word kw // 2.
        h = tl.load(qw_ptr + row_w + (K // 16 + kw[None, :] // 2))
        h = h >> ((kw[None, :] % 2) * 16)
        t = _arrange16(_f32_3(w, h, 0, Z, S, MN, HM), _f32_3(w, h, 1, Z, S, MN, HM),
                       _f32_3(w, h, 2, Z, S, MN, HM), _f32_3(w, h, 3, Z, S, MN, HM),
                       _f32_3(w, h, 4, Z, S, MN, HM), _f32_3(w, h, 5, Z, S, MN, HM),
                       _f32_3(w, h, 6, Z, S, MN, HM), _f32_3(w, h, 7, Z, S, MN, HM),
                       _f32_3(w, h, 8, Z, S, MN, HM), _f32_3(w, h, 9, Z, S, MN, HM),
                       _f32_3(w, h, 10, Z, S, MN, HM), _f32_3(w, h, 11, Z, S, MN, HM),
                       _f32_3(w, h, 12, Z, S, MN, HM), _f32_3(w, h, 13, Z, S, MN, HM),
                       _f32_3(w, h, 14, Z, S, MN, HM), _f32_3(w, h, 15, Z, S, MN, HM), PERM).to(DT)
    return tl.reshape(t, [BLOCK_N, BLOCK_K])


@triton.jit
def dot_acc(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b; through float32 in the interpreter (its bf16 dot is wrong) and for fp32."""
    if INTERP or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def nf4_absmax_raw(a_ptr, aq_ptr, a2_ptr, bidx, DQ: tl.constexpr):
    """The stored absmax data of the blocks at flat indices ``bidx`` (any shape), for
    ``nf4_absmax_fin``: (absmax, absmax), or with double quantization (code, absmax2)."""
    if DQ:
        return tl.load(aq_ptr + bidx).to(tl.int32), tl.load(a2_ptr + bidx // 256)
    else:
        a = tl.load(a_ptr + bidx)
        return a, a


@triton.jit
def nf4_absmax_fin(r0, r1, dmap_ptr, off_ptr, DQ: tl.constexpr):
    """float32 absmax from ``nf4_absmax_raw`` (undoing double quantization)."""
    if DQ:
        return tl.load(dmap_ptr + r0) * r1 + tl.load(off_ptr)
    else:
        return r0


@triton.jit
def nf4_absmax_at(a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, bidx, DQ: tl.constexpr):
    """float32 absmax of the blocks at flat indices ``bidx`` (any shape; undoing double quant)."""
    r0, r1 = nf4_absmax_raw(a_ptr, aq_ptr, a2_ptr, bidx, DQ)
    return nf4_absmax_fin(r0, r1, dmap_ptr, off_ptr, DQ)


@triton.jit
def nf4_absmax(a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, rows, gi, G, DQ: tl.constexpr):
    """float32 absmax [BN, 1] of block ``gi`` of every row (undoing double quantization)."""
    return nf4_absmax_at(a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, rows * G + gi, DQ)[:, None]


@triton.jit
def _nf4_pair(w, SH: tl.constexpr, lut_ptr, A, DT: tl.constexpr, F32MATH: tl.constexpr):
    """Byte at bit SH of every word -> (value of its high nibble, of its low nibble) * A."""
    b = (w >> SH) & 255
    if DT == tl.float32:
        first = tl.load(lut_ptr + b) * A
        second = tl.load(lut_ptr + 256 + b) * A
        return first, second
    else:
        e = tl.load(lut_ptr + b)          # int32: two DT values, the high nibble's in the low half
        first = e.to(tl.int16).to(DT, bitcast=True)
        second = (e >> 16).to(tl.int16).to(DT, bitcast=True)
        if F32MATH:
            af = A.to(tl.float32)
            return (first.to(tl.float32) * af).to(DT), (second.to(tl.float32) * af).to(DT)
        else:
            return first * A, second * A


@triton.jit
def nf4_tile(qw_ptr, lut_ptr, rows, kw0, stride_qw, A, DT: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32MATH: tl.constexpr = False):
    """Dequantized nf4/fp4 tile [BLOCK_N, BLOCK_K] in DT, natural K order, inside one block.

    The packed bytes are read as int32 words (8 codes each); kw0 is the tile's first word in its
    row. Each byte is looked up whole in a 256-entry table (``lut_ptr``): for 16-bit DT an
    int32 holding both codes' values as a DT pair in K order (so one lookup and one packed
    multiply give two weights already paired for the tensor cores); for float32 two float32
    tables (high nibble's values, then low nibble's). A: absmax [BN, 1] in DT (float32 for fp32).
    """
    BW: tl.constexpr = BLOCK_K // 8
    kw = kw0 + tl.arange(0, BW)
    w = tl.load(qw_ptr + rows[:, None] * stride_qw + kw[None, :])          # [BN, BW] int32
    f0, s0 = _nf4_pair(w, 0, lut_ptr, A, DT, F32MATH)
    f1, s1 = _nf4_pair(w, 8, lut_ptr, A, DT, F32MATH)
    f2, s2 = _nf4_pair(w, 16, lut_ptr, A, DT, F32MATH)
    f3, s3 = _nf4_pair(w, 24, lut_ptr, A, DT, F32MATH)
    t = tl.join(_join4(f0, f1, f2, f3), _join4(s0, s1, s2, s3))           # [BN, BW, 2, 2, 2]
    return tl.reshape(t, [BLOCK_N, BLOCK_K])
