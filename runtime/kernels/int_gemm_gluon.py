"""Gluon prototype of the prefill GEMM for 4-bit ``int`` weights with uint8 zeros on Hopper
(sm_90): ``out.T [N, BM] = W [N, K] @ x.T [K, BM]`` with W, dequantized and scaled in
registers, as the register A operand of ``warpgroup_mma`` (wgmma) and x tiles as its shared
memory B operand. ``int_gemm``'s tuner times the ``TUNED`` configs on sm_90 GPUs for M buckets
64-512 (``int_gemm.GLUON_M``). Offline compile report: ``benchmarks/gluon_offline.py --gemm``;
first timings: ``benchmarks/gluon_gemm.py``.

Why: the Triton GEMM (``int_gemm.py``) reaches 49-56% of cuBLAS bf16 at M = 256 on three of
the Llama shapes; there the dequantized tile goes to shared memory for a layout change before
the tensor cores read it. Here it does not: the packed words come through a ``cp.async`` ring
in shared memory (as in ``int_gemv_gluon``'s ST loop), are unpacked into exactly the registers
wgmma reads, and only x (reused by every row of W) is read by the tensor cores from shared
memory.

K order: a wgmma register A operand must have ``k_width = 2``. Its linear layout over (n, k)
for a ``[64, 128]`` tile (triton 3.6, ``to_linear_layout``) is::

    reg  k1 n8 k8 k16 k32 k64     lane  k2 k4 n1 n2 n4     warp  n16 n32

which is the ``mma_v2`` ``k_width = 8`` layout that ``int_gemv_gluon`` builds from the words
(reg k1 k2 k4 n8 k32 k64, lane k8 k16 n1 n2 n4) with the K bits relabelled and registers in
another order. So the tile is built as in the GEMV (its "v2" logical K order), the K bits are
relabelled by one reshape/permute (v2 k1 k2 k4 k8 k16 -> k1 k8 k16 k2 k4), and the layout
conversion is a register renaming. The dot is invariant under a permutation of K applied to
both operands, so x is copied once per call into the same order (``order()``), then read by
plain 16-byte ``cp.async`` copies into a 128-byte-swizzled tile.

Each sub-tile's wgmma is waited for (wait 0) before the next tile is built. With wait(1) the
next tile would be built while the previous wgmma still reads its A registers; ``deps`` of
``warpgroup_mma_wait`` keep the 16-bit values alive, not the packed 32-bit registers wgmma
reads, and ptxas reused those for other values (seen in the sm_90 SASS). Overlap comes from the
other CTA or warpgroups on the SM instead.

Scales: ``(q - z) / 16`` is exact in bf16/fp16 (as in the GEMV); one ``mul.rn`` by ``16 s``
rounds once to x's dtype, as the Triton GEMM's dequantized tile does.
"""
from __future__ import annotations

import functools

from runtime.kernels import int_gemv_gluon as V
from runtime.kernels.splitk_gluon import write_tile

HAVE_GLUON = V.HAVE_GLUON
try:                                                   # hopper ops: triton >= 3.5 (written for 3.6)
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared,
                                                                   warpgroup_mma,
                                                                   warpgroup_mma_wait)
except Exception:                                      # pragma: no cover - depends on triton
    HAVE_GLUON = False

gluon, gl, cp = V.gluon, V.gl, V.cp
SUBK = V.SUBK_K                                        # K per sub-tile: 16 packed words a row
SUBK_C = V.SUBK                                        # the same, for kernels


def order() -> list[int]:
    """For each wgmma-logical k' in a 128-wide sub-tile, the physical k it holds: physical k =
    8 (4a + b) + 4h + 2jh + jl in int_gemv_gluon's order (b, a, jh, jl, h), then relabelled."""
    import torch
    v2 = torch.arange(SUBK).view(4, 4, 2, 2, 2).permute(1, 0, 3, 4, 2).reshape(SUBK)
    return v3_relabel(v2).tolist()


def v3_relabel(t):
    """The kernel's K relabelling on a torch tensor ``[..., 128]`` in the v2 order (reference)."""
    s = t.shape[:-1]
    t = t.reshape(*s, 2, 2, 2, 2, 2, 2, 2)                 # k64 k32 k16 k8 k4 k2 k1
    n = len(s)
    t = t.permute(*range(n), n, n + 1, n + 4, n + 5, n + 2, n + 3, n + 6)
    return t.reshape(*s, SUBK)


if HAVE_GLUON:
    from runtime.kernels.gluon_gemv_parts import _q_tile, _v2_tile

    @gluon.jit
    def _pair_s(w, SH: gl.constexpr, Z2, S2, P: gl.constexpr, DT: gl.constexpr, ASM: gl.constexpr):
        v = V._align(w, SH, P)
        if DT == gl.bfloat16:
            return gl.inline_asm_elementwise(ASM, "=h,=h,r,r,r", [v, Z2, S2],
                                             dtype=(gl.bfloat16, gl.bfloat16), is_pure=True, pack=1)
        else:
            return gl.inline_asm_elementwise(ASM, "=h,=h,r,r,r", [v, Z2, S2],
                                             dtype=(gl.float16, gl.float16), is_pure=True, pack=1)

    @gluon.jit
    def _a_tile(w, z, s, P: gl.constexpr, DT: gl.constexpr, ASM: gl.constexpr, ONE: gl.constexpr,
                BLOCK_N: gl.constexpr, LA: gl.constexpr, FS: gl.constexpr = False):
        """Words ``[BN, 16]`` -> the scaled weights ``[BN, 128]`` as wgmma's register A operand
        (FS: ``q - z`` unscaled, as the GEMV builds it, ``_q_tile``; ``s`` and ``ASM`` unused)."""
        if FS:
            t = _q_tile(w, z, DT, BLOCK_N)                                      # v2 order
        else:
            Z2 = gl.expand_dims((ONE + (z << P)) * 0x10001, 1)
            s16 = (s.to(gl.float32) * 16.0).to(DT).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
            S2 = gl.expand_dims(s16 | (s16 << 16), 1)
            l0, h0 = _pair_s(w, 0, Z2, S2, P, DT, ASM)
            l1, h1 = _pair_s(w, 4, Z2, S2, P, DT, ASM)
            l2, h2 = _pair_s(w, 8, Z2, S2, P, DT, ASM)
            l3, h3 = _pair_s(w, 12, Z2, S2, P, DT, ASM)
            t = _v2_tile(l0, h0, l1, h1, l2, h2, l3, h3, BLOCK_N)               # v2 order
        t = gl.reshape(t, [BLOCK_N, 2, 2, 2, 2, 2, 2, 2])                       # k64 .. k1
        t = gl.permute(t, (0, 1, 2, 5, 6, 3, 4, 7))                            # v3 order
        return gl.convert_layout(gl.reshape(t, [BLOCK_N, SUBK_C]), LA)          # registers renamed

    @gluon.jit
    def _zs(z_ptr, s_ptr, zs_off, s_off, k0, i, GROUP: gl.constexpr):
        """The zeros (int32) and scales of sub-tile ``i`` of the program's slice."""
        gi = (k0 + i * SUBK_C) // GROUP
        return gl.load(z_ptr + zs_off + gi).to(gl.int32), gl.load(s_ptr + s_off + gi)

    @gluon.jit
    def _int4_gemm_wgmma(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, fin_ptr, cnt_ptr, M, N, K, G,
                         stride_xm, stride_om, stride_fin, stride_qw, GROUP: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, ST: gl.constexpr,
                         SPLIT_K: gl.constexpr, FIXUP: gl.constexpr, ZP: gl.constexpr,
                         FS: gl.constexpr):
        NW: gl.constexpr = gl.num_warps()
        DT: gl.constexpr = x_ptr.dtype.element_ty
        BF16: gl.constexpr = DT == gl.bfloat16
        P: gl.constexpr = 3 if BF16 else 6
        ONE: gl.constexpr = 0x3F80 if BF16 else 0x3C00
        ASM: gl.constexpr = V._asm(BF16, True)
        LW: gl.constexpr = V._word_layout(BLOCK_N, NW)
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        LA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        LXC: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [NW, 1], [1, 0])
        SX: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        pid = gl.program_id(0)                         # M tiles of one row block run together:
        num_m = gl.cdiv(M, BLOCK_M)                    # they share the weight tile in L2
        pid_m = pid % num_m
        pid_n = pid // num_m
        nsub = K // SPLIT_K // SUBK_C                  # sub-tiles in this program's slice of K
        k0 = gl.program_id(1) * nsub * SUBK_C          # (so: a multiple of 128, 16-byte copies)
        rows_w = (pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LW))) % N
        offs_p = gl.arange(0, 16, layout=gl.SliceLayout(0, LW))
        w_base = (qw_ptr + k0 // 8 + gl.expand_dims(rows_w * stride_qw, 1)
                  + gl.expand_dims(offs_p, 0))
        zs_off = rows_w * G
        if FS:                                         # scales: one per row of the result
            rows_s = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
            s_off = (rows_s % N) * G
        else:
            s_off = zs_off
        xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LXC))
        xk = gl.arange(0, SUBK_C, layout=gl.SliceLayout(0, LXC))
        x_base = x_ptr + k0 + gl.expand_dims((xm % M) * stride_xm, 1) + gl.expand_dims(xk, 0)
        wring = gl.allocate_shared_memory(gl.int32, [ST, BLOCK_N, 16],
                                          gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        xring = gl.allocate_shared_memory(DT, [ST, BLOCK_M, SUBK_C], SX)
        D: gl.constexpr = ST - 1
        for j in gl.static_range(D):
            kj = (j % nsub) * SUBK_C
            cp.async_copy_global_to_shared(wring.index(j), w_base + kj // 8)
            cp.async_copy_global_to_shared(xring.index(j), x_base + kj)
            cp.commit_group()
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        if ZP > 0:                                     # sub-tiles 0 .. ZP - 1, carried
            z, s = _zs(z_ptr, s_ptr, zs_off, s_off, k0, 0, GROUP)
        if ZP > 1:
            z1, s1 = _zs(z_ptr, s_ptr, zs_off, s_off, k0, 1 % nsub, GROUP)
        for i in range(nsub):
            if FS:                                     # past the end: the last again, unused
                kc = gl.minimum(i + D, nsub - 1) * SUBK_C
            else:
                kc = ((i + D) % nsub) * SUBK_C              # wraps at the end: unused
            cp.async_copy_global_to_shared(wring.index((i + D) % ST), w_base + kc // 8)
            cp.async_copy_global_to_shared(xring.index((i + D) % ST), x_base + kc)
            cp.commit_group()
            if ZP == 0:                                # loaded at use: one latency a sub-tile
                z, s = _zs(z_ptr, s_ptr, zs_off, s_off, k0, i, GROUP)
            else:                                      # ZP sub-tiles ahead (wraps: unused)
                zn, sn = _zs(z_ptr, s_ptr, zs_off, s_off, k0,
                             gl.minimum(i + ZP, nsub - 1) if FS else (i + ZP) % nsub, GROUP)
            cp.wait_group(D)
            a = _a_tile(wring.index(i % ST).load(LW), z, s, P, DT, ASM, ONE, BLOCK_N, LA, FS)
            fence_async_shared()
            if FS:                                     # this sub-tile alone, scaled in float32
                part = warpgroup_mma(a, xring.index(i % ST).permute((1, 0)), acc, use_acc=False,
                                     is_async=True)
                part = warpgroup_mma_wait(0, deps=[part])
                acc += part * gl.expand_dims(s.to(gl.float32), 1)
            else:
                acc = warpgroup_mma(a, xring.index(i % ST).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(0, deps=[acc])
            if ZP == 1:
                z, s = zn, sn
            elif ZP == 2:
                z, s, z1, s1 = z1, s1, zn, sn
        cp.wait_group(0)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        write_tile(acc, out_ptr, cnt_ptr, fin_ptr, pid, gl.program_id(1), offs_n, offs_m,
                   pid_n * BLOCK_N, pid_m * BLOCK_M, M, N, stride_om, stride_fin, SPLIT_K, FIXUP)


def cfg(bn=64, bm=128, st=3, nw=4, sk=1, zp=0, fs=False):
    """A config; ``zp``: the zeros and scales loaded that many sub-tiles ahead (0: at use);
    ``fs``: each sub-tile's product scaled in float32 (the A operand unscaled, ``q - z``)."""
    c = {"BLOCK_N": bn, "BLOCK_M": bm, "ST": st, "SPLIT_K": sk, "num_warps": nw}
    return {**c, **({"ZP": zp} if zp else {}), **({"FS": True} if fs else {})}


# One warpgroup (4 warps) per 64 rows of W. Each CTA reads all of its x rows from L2 for only
# BLOCK_N rows of W, so BLOCK_N x BLOCK_M sets the L2 traffic per flop: 2 BN BM / (2 BM + BN / 2)
# flop per byte, 60 at 64 x 256, 114 at 128 x 256. (BLOCK_N 128 on one warpgroup with BLOCK_M
# 128 spills registers when compiled for sm_90: not listed.)
# SPLIT_K > 1 (float32 partials, added afterwards in a fixed order) gives the shapes with few
# row blocks (N 4096-8192 at BLOCK_N 128) enough programs to fill the SMs.
CONFIGS = [cfg(64, 128), cfg(64, 256, st=2), cfg(64, 64, st=4), cfg(128, 64, st=4),
           cfg(128, 128, nw=8), cfg(128, 256, st=2, nw=8), cfg(256, 128, nw=16),
           cfg(256, 64, st=4, nw=16), cfg(64, 128, sk=2), cfg(64, 256, st=2, sk=2),
           cfg(128, 256, st=2, nw=8, sk=2), cfg(128, 256, st=2, nw=8, sk=4)]
# What int_gemm's tuner times: those its tuner picked at M = 256 on an H100 for the six Llama
# shapes of benchmarks/kernels.py (2026-11-27; benchmarks/results/kernels-wgmma*).
# (64 x 128 split 2, the fastest on 4096x4096 by triton.testing.do_bench, is tried as well.)
TUNED = [cfg(64, 64, st=4), cfg(64, 256, st=2), cfg(128, 256, st=2, nw=8),
         cfg(128, 256, st=2, nw=8, sk=2), cfg(128, 256, st=2, nw=8, sk=4), cfg(64, 128, sk=2)]


# Decode (M = 9-16: wgmma with N = 16), int_gemv candidates on sm_90 with EXA_GEMV_WGMMA=1
# (``int_gemv.wgmma_on``): one warpgroup per 64 rows, the zeros/scales one sub-tile ahead,
# float32 scales, and few ring slots (more programs an SM): the fastest of DECODE_X at M = 16 on
# an H100 (benchmarks/results/gemv-ab-wgmma-{fs,ov}-h100-2026-11-27.txt).
DECODE = [cfg(64, 16, st=st, sk=sk, zp=1, fs=True)
          for st, sk in ((2, 1), (3, 1), (4, 2), (3, 2), (3, 4))]
# Tried (2026-11-27, gemv_ab.py --wgmma): the first decode list (zeros/scales loaded at use,
# scales applied in bf16), its ZP 1 / 2 variants, and other rows, splits and ring slots.
DECODE_OLD = [cfg(64, 8, st=4), cfg(64, 8, st=8), cfg(64, 16, st=4), cfg(64, 16, st=8),
              cfg(128, 16, st=4, nw=8), cfg(128, 16, st=8, nw=8), cfg(64, 16, st=4, sk=2),
              cfg(64, 8, st=6, sk=2)]
DECODE_X = (DECODE_OLD + [{**c, "ZP": zp} for zp in (1, 2) for c in DECODE_OLD]
            + [cfg(64, bm, st=st, sk=sk, zp=1)
               for bm in (8, 16) for st, sk in ((6, 1), (4, 4), (8, 2))]
            + [cfg(128, 16, st=st, nw=8, sk=sk, zp=1) for st, sk in ((4, 2), (4, 4), (6, 1))]
            + [cfg(bn, bm, st=st, nw=nw, sk=sk, zp=1, fs=True)
               for bn, bm, st, nw, sk in (
                   (64, 16, 4, 4, 1), (64, 16, 8, 4, 1), (128, 16, 4, 8, 1), (128, 16, 6, 8, 1),
                   (128, 16, 4, 8, 2), (128, 16, 4, 4, 1), (128, 16, 6, 4, 1), (128, 16, 4, 4, 2),
                   (64, 8, 4, 4, 1), (64, 8, 8, 4, 1), (64, 8, 4, 4, 2), (128, 8, 4, 4, 1),
                   (128, 8, 4, 4, 2), (256, 16, 4, 8, 1), (256, 16, 4, 8, 2), (128, 16, 8, 4, 1),
                   (128, 16, 2, 4, 1), (128, 16, 3, 4, 1), (128, 16, 2, 8, 1), (128, 16, 3, 8, 1),
                   (64, 16, 2, 4, 2), (64, 8, 2, 4, 1), (64, 8, 3, 4, 1), (64, 8, 3, 4, 2))])


def valid(c: dict, M: int, N: int, K: int, spec) -> bool:
    """Weights ``V.format_fits`` takes; 64 rows of W per warpgroup (4 warps)."""
    return (V.format_fits(spec, K) and c["num_warps"] in (4, 8, 16) and c["ST"] >= 2
            and K % (SUBK * c["SPLIT_K"]) == 0
            and c["BLOCK_N"] % (16 * c["num_warps"]) == 0
            and c["BLOCK_M"] in (8, 16, 32, 64, 128, 256) and c["BLOCK_M"] >= 2 * c["num_warps"])


@functools.cache
def _order_index(device):
    import torch
    return torch.tensor(order(), device=device)


def permute_x(x):
    """x [M, K] -> copy with every 128-wide K sub-tile in the kernel's order (``order()``): one
    Triton gather on the GPU (``k_order.permute_k``), ``permute_x_ref`` elsewhere."""
    if x.is_cuda:
        from runtime.kernels.k_order import permute_k
        return permute_k(x)
    return permute_x_ref(x)


def permute_x_ref(x):
    """``permute_x`` in torch (index_select): the reference."""
    M, K = x.shape
    return x.reshape(M, K // SUBK, SUBK).index_select(2, _order_index(x.device)).reshape(M, K)


def launch(x, t, spec, N, K, c, out=None):
    """Run one config: x [M, K] (bf16/fp16) -> out [M, N] in x.dtype (sm_90 only)."""
    import torch
    import triton
    from runtime.kernels.splitk import fused_counters, partials, sum_partials
    from runtime.kernels.common import prepare_gluon
    M, g, out = prepare_gluon(x, t, spec, N, K, c, out, valid, HAVE_GLUON)
    xp = permute_x(x.contiguous())
    sk = c["SPLIT_K"]
    dst = partials(out, sk)                            # float32 [sk, M, N] when K is split
    tiles = triton.cdiv(N, c["BLOCK_N"]) * triton.cdiv(M, c["BLOCK_M"])
    cnt = fused_counters({**c, "FIXUP": True}, x.device, tiles)   # None: not split (or capturing)
    _int4_gemm_wgmma[(tiles, sk)](
        xp, t["qweight"].view(torch.int32), t["scales"], t["zeros"], dst, out,
        dst if cnt is None else cnt, M, N, K, K // g, xp.stride(0), dst.stride(-2), out.stride(0),
        K // 8, GROUP=g, BLOCK_N=c["BLOCK_N"], BLOCK_M=c["BLOCK_M"], ST=c["ST"], SPLIT_K=sk,
        FIXUP=cnt is not None, ZP=c.get("ZP", 0), FS=c.get("FS", False),
        num_warps=c["num_warps"])
    if cnt is None:
        sum_partials(dst, out)                         # partials added in a fixed order
    return out
