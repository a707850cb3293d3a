"""Decode GEMV (M <= 16) for 4-bit ``int`` weights with uint8 zeros on Hopper (sm_90): the
wgmma kernel of ``int_gemm_gluon`` (FS configs: each 128-wide K sub-tile's ``q - z`` as the
register A operand, x from shared memory as B, the product scaled in float32), with both
operands brought in by TMA instead of ``cp.async``.

Why: Nsight Compute on the ``cp.async`` version at M = 16 (28672x8192, one H100,
``benchmarks/device_ncu_m16.sh``) shows 19% of warp cycles stalled at the CTA barrier that
follows each sub-tile's ``cp.async`` wait (every thread copies part of the tile, so all must
meet before wgmma reads it) and 23-28% on long scoreboard. Here one thread issues each
sub-tile's two TMA copies and every warp waits on that slot's mbarrier: no CTA barrier, no copy
instructions or address arithmetic in the loop.

Slot reuse: the copy into slot ``(i - 1) % ST`` is issued in step i, after the issuing thread
has passed step i - 1's wgmma wait; that wgmma, collective over the warpgroup, started only after
every warp had read its words of that slot (they are its A operand), and it has finished
reading x from the slot. ``fence_async_shared`` after each step's shared-memory reads orders
them before the async proxy's writes.
"""
from __future__ import annotations

import functools

from runtime.kernels import int_gemm_gluon as W
from runtime.kernels import int_gemv_gluon as V
from runtime.kernels.splitk_gluon import finish_tile

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

if HAVE_GLUON:
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
                  ST: gl.constexpr):
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
                       FIXUP: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        LW: gl.constexpr = V._word_layout(BLOCK_N, NW)
        pid_n = gl.program_id(0)
        n0 = pid_n * BLOCK_N
        nsub = K // SPLIT_K // W.SUBK_C                # sub-tiles in this program's slice of K
        k0 = gl.program_id(1) * nsub * W.SUBK_C
        zs_off = ((n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LW))) % N) * G
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
                         BLOCK_N, BLOCK_M, ST)),
            (_producer, (w_desc, x_desc, wring, xring, ready, empty, n0, k0, nsub, ST)),
        ], [1], [24])
        offs_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        if FIXUP:                                      # the tile's last split adds them up
            finish_tile(acc, out_ptr, cnt_ptr, fin_ptr, pid_n, gl.program_id(1), offs_n, offs_m,
                        n0, 0, M, N, stride_fin, SPLIT_K)
        else:                                          # the output, or (split K) a partial
            o_ptrs = (out_ptr + gl.program_id(1) * M * stride_om
                      + gl.expand_dims(offs_m, 0) * stride_om + gl.expand_dims(offs_n, 1))
            o_mask = (gl.expand_dims(offs_m, 0) < M) & (gl.expand_dims(offs_n, 1) < N)
            gl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def cfg(bn=64, bm=16, st=3, nw=4, sk=1, rg=64):
    """``rg``: the CTA's register budget a thread (``maxnreg``; the producer warp's warpgroup
    gives up all but 24, the consumers get the rest)."""
    return {"BLOCK_N": bn, "BLOCK_M": bm, "ST": st, "SPLIT_K": sk, "num_warps": nw, "RG": rg}


# Tried (benchmarks/gemv_ab.py --tma): one warpgroup per 64 rows (or two per 128), 2-6 slots,
# split K 1-4, register budgets 64 / 80 (benchmarks/results/gemv-ab-tma-h100-2026-11-27.*).
CONFIGS = ([cfg(64, 16, st, 4, sk) for st, sk in ((2, 1), (3, 1), (4, 1), (6, 1), (3, 2), (4, 2),
                                                    (3, 4), (4, 4))]
           + [cfg(128, 16, st, 8, 1) for st in (3, 4)] + [cfg(64, 8, 3, 4, 1), cfg(64, 8, 4, 4, 1)]
           + [cfg(64, 16, 4, 4, 1, rg=80), cfg(64, 16, 4, 4, 4, rg=80)])


# What int_gemv's tuner times at M = 9-16 (``int_gemv.tma_on``): the fastest of CONFIGS on the two
# 70B MLP shapes at M = 16 on an H100 (split 1 for many rows, 2 / 4 for long K), and split 8.
DECODE = [cfg(64, 16, 3, 4, 1), cfg(64, 16, 2, 4, 1), cfg(128, 16, 4, 8, 1), cfg(64, 16, 4, 4, 2),
          cfg(64, 16, 3, 4, 4), cfg(64, 16, 3, 4, 8)]


def ring_twin(c: dict) -> dict:
    """The ``int_gemm_gluon`` config that computes the same bits through a ``cp.async`` ring."""
    return W.cfg(c["BLOCK_N"], c["BLOCK_M"], st=c["ST"], nw=c["num_warps"], sk=c["SPLIT_K"],
                 zp=1, fs=True)


def valid(c: dict, M: int, N: int, K: int, spec) -> bool:
    """As ``int_gemm_gluon.valid``, for one M tile (M <= BLOCK_M <= 16)."""
    return (W.valid(c, M, N, K, spec) and M <= c["BLOCK_M"] <= 16 and c["ST"] >= 2
            and N >= c["BLOCK_N"])


@functools.cache
def _layouts(BN: int, BM: int, bits: int):
    wl = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    xl = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=2)
    return wl, xl


def launch(x, t, spec, N, K, c, out=None):
    """Run one config: x [M, K] (bf16/fp16, M <= BLOCK_M) -> out [M, N] in x.dtype (sm_90)."""
    import torch
    import triton
    from runtime.kernels.common import prepare_gluon
    from runtime.kernels.splitk import fused_counters, partials, sum_partials
    qw = t["qweight"].view(torch.int32)
    if qw.data_ptr() % 16:                             # TMA reads 16-byte-aligned tensors only
        return W.launch(x, t, spec, N, K, ring_twin(c), out)
    M, g, out = prepare_gluon(x, t, spec, N, K, c, out, valid, HAVE_GLUON)
    xp = W.permute_x(x.contiguous())
    wl, xl = _layouts(c["BLOCK_N"], c["BLOCK_M"], 16)
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
        BLOCK_M=c["BLOCK_M"], ST=c["ST"], SPLIT_K=sk, FIXUP=cnt is not None,
        num_warps=c["num_warps"], maxnreg=c["RG"])
    if cnt is None:
        sum_partials(dst, out)
    return out
