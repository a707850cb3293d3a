"""Host-callable pieces of the Gluon int4 kernels (int_gemv_gluon.py, int_gemm_gluon.py): the
register/lane/warp bases of their linear layouts and the inline-PTX dequantization of a packed
word pair (see int_gemv_gluon.py's docstring for what the layouts mean)."""
from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    HAVE_GLUON = True
except Exception:                                      # pragma: no cover - depends on triton
    gluon = gl = None
    HAVE_GLUON = False

_cfn = gluon.constexpr_function if HAVE_GLUON else (lambda f: f)   # host-callable either way
SUBK_K = 128                                           # K per mma sub-tile (= 16 words / row)
SUBK = gl.constexpr(SUBK_K) if HAVE_GLUON else SUBK_K  # the same, for kernels


@_cfn
def _warp_bases(nw: int, n_axis: bool, rank: int):
    out = []
    for i in range(nw.bit_length() - 1):
        b = [0] * rank
        if n_axis:
            b[0] = 16 << i
        out.append(b)
    return out


@_cfn
def word_layout_bases(BN: int, NW: int):
    """(reg, lane, warp) bases of the packed words ``[BN, 16]`` (row n, physical word p)."""
    reg = [[0, 1], [0, 2], [8, 0]]
    r = 16 * NW
    while r < BN:
        reg.append([r, 0])
        r *= 2
    lane = [[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]]
    return reg, lane, _warp_bases(NW, True, 2)


@_cfn
def x_layout_bases(BM: int, NW: int):
    """(reg, lane, warp) bases of the x tile ``[16 (p), BM, 8 (code)]`` (warps replicate it)."""
    reg = [[0, 0, 1], [0, 0, 2], [0, 0, 4], [1, 0, 0], [2, 0, 0]]
    if BM == 16:
        reg.append([0, 8, 0])
    lane = [[4, 0, 0], [8, 0, 0], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
    return reg, lane, _warp_bases(NW, False, 3)


@_cfn
def x_word_layout_bases(BM: int, NW: int):
    """(reg, lane, warp) bases of x as 32-bit words ``[16 (p), BM, 4 (code pair)]``: the same
    threads and order as ``x_layout_bases`` with the lowest code bit inside the word."""
    reg, lane, warp = x_layout_bases(BM, NW)
    return [[0, 0, 1], [0, 0, 2]] + reg[3:], lane, warp


@_cfn
def _asm(bf16: bool, scaled: bool = False, low: bool = False) -> str:
    """``(lo, hi) = halves of ((v & MASK) | ONE) - Z2``: codes at bits 3..6 (bf16) / 6..9 (fp16)
    under the exponent of 1.0 give ``1 + q/16``; minus ``1 + z/16`` is exact (``scaled``: then
    times ``$4`` = 16 s, twice, one rounding: ``(q - z) s``). ``low``: the codes at bits 0..3
    under the exponent of 128 (bf16) / 1024 (fp16), where the last mantissa bit is 1: ``128 + q``
    minus ``128 + z`` is ``q - z`` (the code at bit 0 needs no shift)."""
    p = 0 if low else (3 if bf16 else 6)
    one = (0x4300 if bf16 else 0x6400) if low else (0x3F80 if bf16 else 0x3C00)
    mask, one = (0xF << p) * 0x10001, one * 0x10001
    ty = "bf16x2" if bf16 else "f16x2"
    mul = f"mul.rn.{ty} t, t, $4; " if scaled else ""
    return (f"{{ .reg .b32 t; lop3.b32 t, $2, {mask}, {one}, 0xEA; sub.rn.{ty} t, t, $3; "
            f"{mul}mov.b32 {{$0, $1}}, t; }}")
