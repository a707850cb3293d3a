"""Decode GEMV (M <= 16) for 4-bit ``int`` weights with uint8 zeros on Hopper (sm_90): the
wgmma kernel of ``int_gemm_gluon`` (FS configs: each 128-wide K sub-tile's ``q - z`` as the
register A operand, x from shared memory as B, the product scaled in float32), with both
operands brought in by TMA instead of ``cp.async``, in a warp-specialized kernel.

Why: Nsight Compute on the ``cp.async`` version at M = 16 (28672x8192, one H100,
``benchmarks/device_ncu_m16.sh``) shows 19% of warp cycles stalled at the CTA barrier that
follows each sub-tile's ``cp.async`` wait (every thread copies part of the tile, so all must
meet before wgmma reads it) and 23-28% on long scoreboard. TMA copies issued by the consumer
warps themselves still get CTA barriers from the compiler's shared-memory analysis, so one
producer warp (``_producer``) issues each sub-tile's two copies once the consumer warpgroup
(``_consumer``) has freed the slot: "ready" / "empty" mbarriers a slot, no CTA barrier and no
copy instructions or address arithmetic in the consumer's loop.

Slot reuse: the consumer arrives on a slot's "empty" barrier after that sub-tile's wgmma wait
(the wgmma, collective over the warpgroup, has read x, and every warp read its words before it);
``fence_async_shared`` after the words' shared-memory reads orders them before the async proxy's
next write of the slot.

K order: as in ``int_gemm_gluon`` (x copied per call into the GEMV's order, ``k_order.py``), or
with NK the natural one: each lane of a quad reads all 16 words of its rows and unpacks code pair
2l, 2l + 1 of each (``nat_asm``), which is wgmma's register A layout over natural K, so x is
read as it is (more instructions a sub-tile, no copy of x).
"""
from __future__ import annotations

import functools

from runtime.kernels import int_gemm_gluon as W
from runtime.kernels import int_gemv_gluon as V
from runtime.kernels.gluon_layouts import _cfn
from runtime.kernels.splitk_gluon import write_tile

HAVE_GLUON = W.HAVE_GLUON
try:                                                   # hopper TMA / mbarrier: triton >= 3.5 (3.6)
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,
                                                                   tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except Exception:                                      # pragma: no cover - depends on triton
    HAVE_GLUON = False

gluon, gl = V.gluon, V.gl
SUBK = W.SUBK                                          # K per sub-tile (16 packed words a row)


@_cfn
def nat_asm(bf16: bool) -> str:
    """NK's unpacking of one word ``$2`` into the lane's code pair 2l, 2l + 1 (``$3``: the prmt
    selector of byte l of the word and of the word shifted right by 4): both codes at bit 0 of
    their half under the exponent of 128 / 1024 (lop3), minus ``$4`` = 128 + z (1024 + z) twice:
    ``q - z``, exactly (as ``_asm(.., low=True)``)."""
    one, ty = (0x4300, "bf16x2") if bf16 else (0x6400, "f16x2")
    return (f"{{ .reg .b32 t, u; shr.b32 u, $2, 4; prmt.b32 t, $2, u, $3; "
            f"lop3.b32 t, t, {0x000F000F}, {one * 0x10001}, 0xEA; sub.rn.{ty} t, t, $4; "
            f"mov.b32 {{$0, $1}}, t; }}")


if HAVE_GLUON:
    @_cfn
    def _nat_layout(BN, NW):
        """Words ``[BN, 4 (l), 16]``: every lane of a quad holds its rows' 16 words (l: which code
        pair of each word it unpacks); with the pairs joined last this is wgmma's register A
        layout over natural K (k = 8 word + 2 l + half)."""
        reg = [[8, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8]]
        r = 16 * NW
        while r < BN:
            reg.append([r, 0, 0])
            r *= 2
        lane = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
        warp = [[16 << i, 0, 0] for i in range(NW.bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [BN, 4, 16])

    @gluon.jit
    def _a_nat(wslot, z, DT: gl.constexpr, BLOCK_N: gl.constexpr):
        """The sub-tile's ``q - z`` in natural K order as wgmma's register A operand (NK)."""
        NW: gl.constexpr = gl.num_warps()
        L3: gl.constexpr = _nat_layout(BLOCK_N, NW)
        BF16: gl.constexpr = DT == gl.bfloat16
        w = gl.expand_dims(wslot.load(gl.SliceLayout(1, L3)), 1)                # [BN, 1, 16]
        lq = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3)))
        sel = gl.expand_dims(gl.expand_dims(lq * 0x11 + (lq + 4) * 0x1100, 0), 2)   # [1, 4, 1]
        z2 = ((0x4300 if BF16 else 0x6400) + z) * 0x10001                     # 128 + z, twice
        nz = gl.expand_dims(gl.expand_dims(z2, 1), 1)                          # [BN, 1, 1]
        if BF16:
            lo, hi = gl.inline_asm_elementwise(nat_asm(True), "=h,=h,r,r,r", [w, sel, nz],
                                               dtype=(gl.bfloat16, gl.bfloat16), is_pure=True,
                                               pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(nat_asm(False), "=h,=h,r,r,r", [w, sel, nz],
                                               dtype=(gl.float16, gl.float16), is_pure=True,
                                               pack=1)
        t = gl.permute(gl.join(lo, hi), (0, 2, 1, 3))                          # [BN, 16, 4, 2]
        return gl.reshape(t, [BLOCK_N, W.SUBK_C])

    @gluon.jit
    def _producer(w_desc, x_desc, wring, xring, ready, empty, n0, k0, nsub, ST: gl.constexpr):
        """One warp: sub-tile i's words and x into slot i % ST once the consumer freed it."""
        NB: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes
        for i in range(nsub):
            slot = i % ST
            mbarrier.wait(empty.index(slot), ((i // ST) & 1) ^ 1)     # (a new barrier: passes)
            kb = k0 + i * W.SUBK_C
            mbarrier.expect(ready.index(slot), NB)
            tma.async_copy_global_to_shared(w_desc, [n0, kb // 8], ready.index(slot),
                                            wring.index(slot))
            tma.async_copy_global_to_shared(x_desc, [0, kb], ready.index(slot), xring.index(slot))

    @gluon.jit
    def _consumer(wring, xring, ready, empty, z_ptr, s_ptr, zs_off, s_off, k0, nsub,
                  GROUP: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                  ST: gl.constexpr, NK: gl.constexpr):
        """The warpgroup: each sub-tile's A operand, wgmma, scaled sum; frees the slot."""
        NW: gl.constexpr = gl.num_warps()
        DT: gl.constexpr = xring.dtype
        BF16: gl.constexpr = DT == gl.bfloat16
        LW: gl.constexpr = V._word_layout(BLOCK_N, NW)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        z, s = W._zs(z_ptr, s_ptr, zs_off, s_off, k0, 0, GROUP)
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        for i in range(nsub):
            slot = i % ST
            zn, sn = W._zs(z_ptr, s_ptr, zs_off, s_off, k0, gl.minimum(i + 1, nsub - 1), GROUP)
            mbarrier.wait(ready.index(slot), (i // ST) & 1)
            if NK:                                     # natural K order: x as it is
                a = gl.convert_layout(_a_nat(wring.index(slot), z, DT, BLOCK_N), LA)
            else:                                      # the GEMV's order: x permuted alike
                a = W._a_tile(wring.index(slot).load(LW), z, s, 3 if BF16 else 6, DT,
                              V._asm(BF16, True), 0x3F80 if BF16 else 0x3C00, BLOCK_N, LA, True)
            fence_async_shared()                       # the words read before TMA rewrites them
            part = warpgroup_mma(a, xring.index(slot).permute((1, 0)), acc, use_acc=False,
                                 is_async=True)
            part = warpgroup_mma_wait(0, deps=[part])
            mbarrier.arrive(empty.index(slot), count=1)
            acc += part * gl.expand_dims(s.to(gl.float32), 1)
            z, s = zn, sn
        return (acc,)                                  # (warp_specialize wants a tuple)

    @gluon.jit
    def _int4_gemv_tma(x_desc, w_desc, s_ptr, z_ptr, out_ptr, fin_ptr, cnt_ptr, M, N, K, G,
                       stride_om, stride_fin, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_M: gl.constexpr, ST: gl.constexpr, SPLIT_K: gl.constexpr,
                       FIXUP: gl.constexpr, NK: gl.constexpr = False):
        NW: gl.constexpr = gl.num_warps()
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        LW: gl.constexpr = V._word_layout(BLOCK_N, NW)
        pid_n = gl.program_id(0)
        n0 = pid_n * BLOCK_N
        nsub = K // SPLIT_K // W.SUBK_C                # sub-tiles in this program's slice of K
        k0 = gl.program_id(1) * nsub * W.SUBK_C
        if NK:
            LZ: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(1, _nat_layout(BLOCK_N, NW)))
        else:
            LZ: gl.constexpr = gl.SliceLayout(1, LW)
        zs_off = ((n0 + gl.arange(0, BLOCK_N, layout=LZ)) % N) * G
        s_off = ((n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))) % N) * G
        wring = gl.allocate_shared_memory(gl.int32, [ST, BLOCK_N, 16], w_desc.layout)
        xring = gl.allocate_shared_memory(x_desc.dtype, [ST, BLOCK_M, W.SUBK_C], x_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [ST, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [ST, 1], mbarrier.MBarrierLayout())
        for b in gl.static_range(ST):
            mbarrier.init(ready.index(b), count=1)
            mbarrier.init(empty.index(b), count=1)
        (acc,) = gl.warp_specialize([
            (_consumer, (wring, xring, ready, empty, z_ptr, s_ptr, zs_off, s_off, k0, nsub, GROUP,
                         BLOCK_N, BLOCK_M, ST, NK)),
            (_producer, (w_desc, x_desc, wring, xring, ready, empty, n0, k0, nsub, ST)),
        ], [1], [24])
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        write_tile(acc, out_ptr, cnt_ptr, fin_ptr, pid_n, gl.program_id(1), offs_n, offs_m, n0, 0,
                   M, N, stride_om, stride_fin, SPLIT_K, FIXUP)


def cfg(bn=64, bm=16, st=3, nw=4, sk=1, rg=64, nk=False):
    """``rg``: the CTA's register budget a thread (``maxnreg``; the producer warp's warpgroup
    gives up all but 24, the consumers get the rest); ``nk``: the A operand built in natural K
    order (each lane unpacks one code pair of all its rows' words), so x is read as it is, not
    copied into the GEMV's K order first."""
    c = {"BLOCK_N": bn, "BLOCK_M": bm, "ST": st, "SPLIT_K": sk, "num_warps": nw, "RG": rg}
    return {**c, "NK": True} if nk else c


# Tried (benchmarks/gemv_ab.py --tma): one warpgroup per 64 rows (or two per 128), 2-6 slots,
# split K 1-4, register budgets 64 / 80 (benchmarks/results/gemv-ab-tma-h100-2026-11-27.*).
CONFIGS = ([cfg(64, 16, st, 4, sk) for st, sk in ((2, 1), (3, 1), (4, 1), (6, 1), (3, 2), (4, 2),
                                                    (3, 4), (4, 4))]
           + [cfg(128, 16, st, 8, 1) for st in (3, 4)] + [cfg(64, 8, 3, 4, 1), cfg(64, 8, 4, 4, 1)]
           + [cfg(64, 16, 4, 4, 1, rg=80), cfg(64, 16, 4, 4, 4, rg=80)]
           + [cfg(bn, bm, st, nw, sk, nk=True) for bn, bm, st, nw, sk in (
               (64, 16, 3, 4, 1), (64, 16, 2, 4, 1), (64, 16, 4, 4, 2), (64, 16, 3, 4, 4),
               (128, 16, 4, 8, 1), (64, 16, 3, 4, 8), (64, 8, 4, 4, 1), (64, 8, 3, 4, 4))])


# What int_gemv's tuner times (``int_gemv.tma_on``): the fastest of CONFIGS on the two 70B MLP
# shapes on an H100 (benchmarks/results/gemv-ab-tma-nk-h100-2026-11-27.*). At M = 9-16 (DECODE):
# the GEMV's K order (x permuted first) is faster where 448 programs of 64 rows run on 28672 rows,
# NK where K is long and split; at M = 5-8 (DECODE8), NK with wgmma N = 8.
DECODE = [cfg(64, 16, 3, 4, 1), cfg(64, 16, 2, 4, 1), cfg(64, 16, 2, 4, 1, nk=True),
          cfg(64, 16, 4, 4, 2, nk=True), cfg(64, 16, 3, 4, 4, nk=True),
          cfg(64, 16, 3, 4, 8, nk=True)]
DECODE8 = [cfg(64, 8, 4, 4, 1, nk=True), cfg(64, 8, 3, 4, 4, nk=True)]


def ring_twin(c: dict) -> dict:
    """The ``int_gemm_gluon`` config that computes the same bits through a ``cp.async`` ring (not
    NK)."""
    return W.cfg(c["BLOCK_N"], c["BLOCK_M"], st=c["ST"], nw=c["num_warps"], sk=c["SPLIT_K"],
                 zp=1, fs=True)


def valid(c: dict, M: int, N: int, K: int, spec) -> bool:
    """As ``int_gemm_gluon.valid``, for one M tile (M <= BLOCK_M <= 16)."""
    return (W.valid(c, M, N, K, spec) and M <= c["BLOCK_M"] <= 16 and c["ST"] >= 2
            and N >= c["BLOCK_N"])


@functools.cache
def _layouts(nk: bool = False):
    """The shared layouts of the words' and x's TMA tiles (x: 16-bit, 128-byte swizzle)."""
    wl = gl.NVMMASharedLayout(swizzle_byte_width=64 if nk else 0, element_bitwidth=32, rank=2)
    xl = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return wl, xl


def launch(x, t, spec, N, K, c, out=None):
    """Run one config: x [M, K] (bf16/fp16, M <= BLOCK_M) -> out [M, N] in x.dtype (sm_90)."""
    import torch
    import triton
    from runtime.kernels.common import prepare_gluon
    from runtime.kernels.splitk import fused_counters, partials, sum_partials
    M, g, out = prepare_gluon(x, t, spec, N, K, c, out, valid, HAVE_GLUON)   # (words: 16-B aligned)
    qw = t["qweight"].view(torch.int32)
    nk = bool(c.get("NK"))
    if nk:                                             # x as it is (TMA: 16-byte aligned rows)
        xp = (x if x.is_contiguous() and x.data_ptr() % 16 == 0
              else x.clone(memory_format=torch.contiguous_format))
    else:
        xp = W.permute_x(x.contiguous())
    wl, xl = _layouts(nk)
    x_desc = TensorDescriptor.from_tensor(xp, [c["BLOCK_M"], SUBK], xl)
    w_desc = TensorDescriptor.from_tensor(qw.view(N, K // 8),
                                          [c["BLOCK_N"], 16], wl)
    sk = c["SPLIT_K"]
    dst = partials(out, sk)
    tiles = triton.cdiv(N, c["BLOCK_N"])
    cnt = fused_counters({**c, "FIXUP": True}, x.device, tiles)
    _int4_gemv_tma[(tiles, sk)](
        x_desc, w_desc, t["scales"], t["zeros"], dst, out, dst if cnt is None else cnt, M, N, K,
        K // g, dst.stride(-2), out.stride(0), GROUP=g, BLOCK_N=c["BLOCK_N"],
        BLOCK_M=c["BLOCK_M"], ST=c["ST"], SPLIT_K=sk, FIXUP=cnt is not None, NK=nk,
        num_warps=c["num_warps"], maxnreg=c["RG"])
    if cnt is None:
        sum_partials(dst, out)
    return out
