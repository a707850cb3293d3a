"""The building blocks of the Gluon int4 GEMV (int_gemv_gluon.py, whose docstring explains the
layouts and the K order): the linear layouts of the packed words, x and the mma, the unpacking of
a word pair into the A operand (``_pair``; a whole sub-tile's ``q - z``: ``_q_tile``, also used by
int_gemm_gluon's FS configs), one 128-wide sub-tile's mma (``_sub_dot``), x's
pointers, as bf16/fp16 values or (``_x_ptrs(.., WORDS=True)`` / ``_x_unpack``) as 32-bit words,
and the shared-memory ring that holds x's sub-tiles for the XS configs (``_xring_alloc`` /
``_xring_read``).
"""
from __future__ import annotations

try:                                                   # gluon: triton >= 3.5 (written for 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    HAVE_GLUON = True
except Exception:                                      # pragma: no cover - depends on triton
    gluon = gl = mma_v2 = None
    HAVE_GLUON = False

from runtime.kernels.gluon_layouts import (SUBK, _asm, _cfn, word_layout_bases,  # noqa: E402
                                           x_layout_bases, x_word_layout_bases)


if HAVE_GLUON:
    @_cfn
    def _word_layout(BN, NW):
        reg, lane, warp = word_layout_bases(BN, NW)
        return gl.DistributedLinearLayout(reg, lane, warp, [], [BN, 16])

    @_cfn
    def _x_layout(BM, NW):
        reg, lane, warp = x_layout_bases(BM, NW)
        return gl.DistributedLinearLayout(reg, lane, warp, [], [16, BM, 8])

    @_cfn
    def _xw_layout(BM, NW):
        reg, lane, warp = x_word_layout_bases(BM, NW)
        return gl.DistributedLinearLayout(reg, lane, warp, [], [16, BM, 4])

    @_cfn
    def _xring_read_layout(BM, NW):
        """x sub-tile in shared memory as ``[4 (p % 4), BM, 4 (p // 4), 8]``: read so that, once
        permuted to ``[16 (p), BM, 8]``, it is ``_x_layout`` (and the 8 lanes of a phase hit 8
        different 16-byte bank groups)."""
        reg = [[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [1, 0, 0, 0], [2, 0, 0, 0]]
        if BM == 16:
            reg.append([0, 8, 0, 0])
        lane = [[0, 0, 1, 0], [0, 0, 2, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 4, 0, 0]]
        warp = [[0, 0, 0, 0] for _ in range(NW.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [4, BM, 4, 8])

    @_cfn
    def _mma_layout(NW, BM):
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1], instr_shape=[16, 8])

    @gluon.jit
    def _align(w, SH: gl.constexpr, P: gl.constexpr):
        """The words shifted so that the code at bit SH (and SH + 16) sits at bit P."""
        if SH > P:
            return w >> (SH - P)
        elif SH < P:
            return w << (P - SH)
        else:
            return w

    @gluon.jit
    def _pair(w, SH: gl.constexpr, Z2, P: gl.constexpr, DT: gl.constexpr, ASM: gl.constexpr):
        """Codes SH/4 and SH/4 + 4 of every word as two DT tensors ``q - z`` (``_asm``)."""
        v = _align(w, SH, P)
        if DT == gl.bfloat16:
            return gl.inline_asm_elementwise(ASM, "=h,=h,r,r", [v, Z2],
                                             dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        else:
            return gl.inline_asm_elementwise(ASM, "=h,=h,r,r", [v, Z2],
                                             dtype=(gl.float16, gl.float16), is_pure=True, pack=1)

    @gluon.jit
    def _wzs_loads(w_base, z_base, s_base, k, GROUP: gl.constexpr, EVICT: gl.constexpr):
        """Sub-tile k's words, zeros (int32) and scales (as stored), from global memory."""
        return (gl.load(w_base + k // 8, eviction_policy=EVICT), gl.load(z_base + k // GROUP).to(gl.int32),
                gl.load(s_base + k // GROUP))

    @gluon.jit
    def _loads(src, k, GROUP: gl.constexpr, EVICT: gl.constexpr, FM: gl.constexpr = False):
        """``_wzs_loads`` and x as 32-bit words (code pairs: values carried from one step to the
        next stay whole registers); ``src``: (words, zeros, scales, x words) pointers and x's
        mask; FM: ``_xw_load``."""
        w_base, z_base, s_base, xw_base, x_mask = src
        w, z, s = _wzs_loads(w_base, z_base, s_base, k, GROUP, EVICT)
        return w, z, s, _xw_load(xw_base + k // 2, x_mask, FM)

    @gluon.jit
    def _xw_load(ptrs, x_mask, FM: gl.constexpr):
        """x's words at ``ptrs``: rows past M (``x_mask``) read as 0; FM (every row of the tile
        is one of x's): no mask, so no registers zeroed before the load."""
        if FM:
            return gl.load(ptrs)
        else:
            return gl.load(ptrs, mask=x_mask, other=0)

    @gluon.jit
    def _x_unpack(xw, DT: gl.constexpr, BLOCK_M: gl.constexpr):
        """x words ``[16, BM, 4]`` (``_xw_layout``) as DT ``[16, BM, 8]`` (``_x_layout``)."""
        if DT == gl.bfloat16:
            lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw],
                                               dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [xw],
                                               dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.convert_layout(gl.reshape(gl.join(lo, hi), [16, BLOCK_M, 8]),
                                 _x_layout(BLOCK_M, gl.num_warps()))

    @gluon.jit
    def _v2_tile(l0, h0, l1, h1, l2, h2, l3, h3, BLOCK_N: gl.constexpr):
        """The four code-pair halves of words ``[BN, 16]`` (``_pair`` at bits 0, 4, 8, 12) as
        ``[BN, 4, 4, 8]`` in the logical K order of the module docstring (v2)."""
        t = gl.join(gl.join(gl.join(l0, l2), gl.join(l1, l3)),
                    gl.join(gl.join(h0, h2), gl.join(h1, h3)))                 # [BN,16,jh,jl,h]
        return gl.permute(gl.reshape(t, [BLOCK_N, 4, 4, 8]), (0, 2, 1, 3))

    @gluon.jit
    def _q_tile(w, z, DT: gl.constexpr, BLOCK_N: gl.constexpr):
        """``q - z`` of words ``[BN, 16]`` as DT, exactly (codes at bit 0 under the exponent of
        128 / 1024, ``_asm``), in the v2 order (``_v2_tile``)."""
        BF16: gl.constexpr = DT == gl.bfloat16
        ASM: gl.constexpr = _asm(BF16, False, True)
        Z2 = gl.expand_dims(((0x4300 if BF16 else 0x6400) + z) * 0x10001, 1)   # 128 + z, twice
        l0, h0 = _pair(w, 0, Z2, 0, DT, ASM)
        l1, h1 = _pair(w, 4, Z2, 0, DT, ASM)
        l2, h2 = _pair(w, 8, Z2, 0, DT, ASM)
        l3, h3 = _pair(w, 12, Z2, 0, DT, ASM)
        return _v2_tile(l0, h0, l1, h1, l2, h2, l3, h3, BLOCK_N)

    @gluon.jit
    def _sub_dot(w, z, xv, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, zero,
                 CH: gl.constexpr = 1):
        """One 128-wide K sub-tile: unpack the words ``w [BN, 16]`` in registers into the A
        operand (``q - z``: codes at bit 0 under the exponent of 128 / 1024, ``_asm``), permute
        x ``[16, BM, 8]`` alike into the B operand, one mma (unscaled); with CH = 2 two
        independent mmas over the K halves, added (accumulator chains half as long)."""
        DT: gl.constexpr = xv.dtype
        MMA: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_M)
        LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=8)
        LB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=8)
        t = _q_tile(w, z, DT, BLOCK_N)
        a = gl.convert_layout(gl.reshape(t, [BLOCK_N, SUBK]), LA)             # no data moves
        xv = gl.reshape(xv, [4, 4, BLOCK_M, 2, 2, 2])                          # a b m h jh jl
        xv = gl.permute(xv, (1, 0, 4, 5, 3, 2))                                # b a jh jl h m
        b = gl.convert_layout(gl.reshape(xv, [SUBK, BLOCK_M]), LB)
        if CH == 2:                      # split on the top K bit (a register bit of both)
            a0, a1 = gl.split(gl.permute(gl.reshape(a, [BLOCK_N, 2, SUBK // 2]), (0, 2, 1)))
            b0, b1 = gl.split(gl.permute(gl.reshape(b, [2, SUBK // 2, BLOCK_M]), (1, 2, 0)))
            return (mma_v2(gl.convert_layout(a0, LA), gl.convert_layout(b0, LB), zero)
                    + mma_v2(gl.convert_layout(a1, LA), gl.convert_layout(b1, LB), zero))
        return mma_v2(a, b, zero)

    @gluon.jit
    def _x_ptrs(x_ptr, stride_xm, M, BLOCK_M: gl.constexpr, WORDS: gl.constexpr = False):
        """Pointers and mask of x's ``[16 (p), BM, 8 (code)]`` tile at K = 0, in ``_x_layout``;
        ``WORDS``: of x as 32-bit words ``[16 (p), BM, 4 (code pair)]`` in ``_xw_layout`` (x's
        rows are a whole number of words apart: K and the row stride are even)."""
        C: gl.constexpr = 4 if WORDS else 8
        if WORDS:
            LX: gl.constexpr = _xw_layout(BLOCK_M, gl.num_warps())
        else:
            LX: gl.constexpr = _x_layout(BLOCK_M, gl.num_warps())
        xp = gl.expand_dims(gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(2, LX))), 1), 2)
        xm = gl.expand_dims(gl.expand_dims(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, LX))), 0), 2)
        xc = gl.expand_dims(gl.expand_dims(gl.arange(0, C, layout=gl.SliceLayout(0, gl.SliceLayout(1, LX))), 0), 1)
        mask = (xm < M) & (xp >= 0) & (xc >= 0)
        if WORDS:
            xw = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
            return xw + xm * (stride_xm // 2) + xp * 4 + xc, mask
        else:
            return x_ptr + xm * stride_xm + xp * 8 + xc, mask

    @gluon.jit
    def _xring_alloc(x_ptr, stride_xm, M, DT: gl.constexpr, BLOCK_M: gl.constexpr,
                     SLOTS: gl.constexpr):
        """A SLOTS-slot ring for x's sub-tiles in shared memory (``[4 (p%4), BM, 4 (p//4), 8]``
        a slot, read by ``_xring_read``) and the pointers/mask of its copies (4 warps)."""
        NW: gl.constexpr = gl.num_warps()
        LXC: gl.constexpr = gl.BlockedLayout([1, 1, 1, 8], [1, 8, 4, 1], [NW, 1, 1, 1], [3, 2, 1, 0])
        xring = gl.allocate_shared_memory(DT, [SLOTS, 4, BLOCK_M, 4, 8],
                                          gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0]))
        cl = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, LXC))))
        cm = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, LXC))))
        ch = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LXC))))
        cc = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, LXC))))
        cl = gl.expand_dims(gl.expand_dims(gl.expand_dims(cl, 1), 2), 3)
        cm = gl.expand_dims(gl.expand_dims(gl.expand_dims(cm, 0), 2), 3)
        ch = gl.expand_dims(gl.expand_dims(gl.expand_dims(ch, 0), 1), 3)
        cc = gl.expand_dims(gl.expand_dims(gl.expand_dims(cc, 0), 1), 2)
        xc_base = x_ptr + cm * stride_xm + (ch * 4 + cl) * 8 + cc
        xc_mask = (cm < M) & (cl >= 0) & (ch >= 0) & (cc >= 0)
        return xring, xc_base, xc_mask

    @gluon.jit
    def _xring_read(xring, slot, BLOCK_M: gl.constexpr):
        """x's sub-tile in ring slot ``slot`` as ``[16 (p), BM, 8]`` in ``_x_layout``."""
        NW: gl.constexpr = gl.num_warps()
        xr = xring.index(slot).load(_xring_read_layout(BLOCK_M, NW))
        return gl.convert_layout(gl.reshape(gl.permute(xr, (2, 0, 1, 3)), [16, BLOCK_M, 8]),
                                 _x_layout(BLOCK_M, NW))
