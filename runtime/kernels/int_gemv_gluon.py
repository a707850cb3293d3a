"""Decode GEMV in Triton's Gluon dialect for 4-bit ``int`` weights with uint8 zeros (M <= 16),
offered to ``int_gemv``'s tuner: the dequantized tile is built directly in the tensor-core
A-operand registers (``int_gemv.py`` lets Triton convert it through shared memory).

``out.T [N, BM] = W [N, K] @ x.T [K, BM]`` with W as the A operand of ``mma_v2``
(m16n8k16), ``DotOperandLayout(0, mma, k_width=8)``. Its linear layout over (n, k) for a
``[BN, 128]`` tile is (triton 3.6, ``to_linear_layout``)::

    reg  k1 k2 k4 | n8 k32 k64 (n64..)   lane  k8 k16 n1 n2 n4    warp  n16 n32 ..

so every thread holds 8 consecutive K, i.e. exactly one int32 word of 8 packed codes, but the
four words of a row that a thread holds are 4 apart (k8/k16 are lanes, k32/k64 registers).
The dot is invariant under a permutation of K applied to both operands, so the kernel uses a
"logical" K order in which a thread's words are contiguous in memory: physical word
``p = 4a + b`` of a 128-wide sub-tile is logical word ``w = 4b + a``. The words are loaded as
``[BN, 16]`` in layout ``_word_layout`` (reg p1 p2: one 16-byte load per thread and 16 rows),
unpacked in registers (shift, lop3 with the exponent of 128 / 1024, packed bf16x2/f16x2
subtract of ``128 + z`` / ``1024 + z``: ``q - z`` exactly) into 8 tensors that ``join``
stacks along new register axes, and ``reshape/permute`` turns ``[BN, 4(a), 4(b), 8]`` into
``[BN, 128]`` in logical order: that linear layout is the A-operand layout, so the final ``convert_layout`` moves no data.
Inside a word the order is ``i = 4 jh + 2 jl + h`` for code ``j + 4h`` (j = 2 jh + jl): the
pair (codes j, j + 4) that one lop3 extracts is the low/high half of one mma register.

x.T goes in as the B operand (k_width 8), in layout ``_x_layout`` over ``[16 (p), BM, 8 (code)]``
(16-byte loads from global memory, or with XS from the cp.async ring), permuted the same way
(one PRMT per register; copying x into pair order first was slower on the H100:
benchmarks/results/gluon-gemv-first-h100-2026-11-27.txt). Where x is held from one step to the
next (PF), it is loaded and carried as 32-bit words and split into halves just before use (as
16-bit values across the loop, ptxas moved their halves with 4-5 PRMT each). The
per-group scale (fp16 -> fp32) is applied to each sub-tile's mma result in float32;
one sub-tile = 128 K = one quantization group, so GROUP must be a multiple of 128.
Each program owns BLOCK_N rows and a 1/SPLIT_K slice of K (float32 partials, summed in order);
the loops (plain, PF, ST/XS) are described at ``cfg``.
"""
from __future__ import annotations

try:                                                   # gluon: triton >= 3.5 (written for 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp, mma_v2
    from runtime.kernels.splitk_gluon import write_tile
    HAVE_GLUON = True
except Exception:                                      # pragma: no cover - depends on triton
    gluon = gl = mma_v2 = cp = None
    HAVE_GLUON = False

from runtime.kernels.gluon_layouts import SUBK, SUBK_K, _asm  # noqa: E402,F401 - re-exported


if HAVE_GLUON:
    from runtime.kernels.gluon_gemv_parts import (_align, _loads, _mma_layout, _sub_dot,  # noqa: F401
                                                  _word_layout, _wzs_loads, _x_layout, _x_ptrs,
                                                  _x_unpack, _xring_alloc, _xring_read, _xw_load)

    @gluon.jit
    def _ring_alloc(x_ptr, stride_xm, M, x_base, x_mask, DT: gl.constexpr, BLOCK_N: gl.constexpr,
                    BLOCK_M: gl.constexpr, ST: gl.constexpr, XS: gl.constexpr):
        """The ST-slot ring of weight sub-tiles in shared memory; with XS a ring for x too
        (``_xring_alloc``) and the pointers/mask its copies use (without XS: the ring and x's
        own pointers, unused)."""
        ring = gl.allocate_shared_memory(gl.int32, [ST, BLOCK_N, 16],
                                         gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        if XS:
            xring, xc_base, xc_mask = _xring_alloc(x_ptr, stride_xm, M, DT, BLOCK_M, ST)
        else:
            xring = ring
            xc_base = x_base
            xc_mask = x_mask
        return ring, xring, xc_base, xc_mask

    @gluon.jit
    def _ring_acc(acc, zero, ring, xring, w_base, z_base, s_base, x_base, x_mask, xc_base,
                  xc_mask, k_lo, nsub, GROUP: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_M: gl.constexpr, NSUB: gl.constexpr, ST: gl.constexpr,
                  XS: gl.constexpr, CH: gl.constexpr, EVICT: gl.constexpr):
        """``acc`` plus the sub-tiles ``k_lo / 128 ..`` (``nsub`` of them, a multiple of NSUB) of
        the rows at ``w_base``: NSUB sub-tiles a step (independent mma chains), the weights (and
        with XS, x) through the ST-slot cp.async ring, D = ST - NSUB sub-tiles ahead; the ring
        is drained on return."""
        NW: gl.constexpr = gl.num_warps()
        LW: gl.constexpr = _word_layout(BLOCK_N, NW)
        D: gl.constexpr = ST - NSUB
        for j in gl.static_range(D):
            kj = k_lo + (j % nsub) * SUBK
            cp.async_copy_global_to_shared(ring.index(j), w_base + kj // 8, eviction_policy=EVICT)
            if XS:
                cp.async_copy_global_to_shared(xring.index(j), xc_base + kj, mask=xc_mask)
            cp.commit_group()
        z1 = gl.load(z_base + k_lo // GROUP).to(gl.int32)
        s1 = gl.load(s_base + k_lo // GROUP).to(gl.float32)
        for i0 in range(0, nsub, NSUB):
            for u in gl.static_range(NSUB):
                kc = k_lo + ((i0 + u + D) % nsub) * SUBK      # wraps at the end: unused
                cp.async_copy_global_to_shared(ring.index((i0 + u + D) % ST), w_base + kc // 8,
                                               eviction_policy=EVICT)
                if XS:
                    cp.async_copy_global_to_shared(xring.index((i0 + u + D) % ST), xc_base + kc,
                                                   mask=xc_mask)
                cp.commit_group()
            cp.wait_group(D)
            for u in gl.static_range(NSUB):
                ks = k_lo + (i0 + u) * SUBK
                z = z1
                s = s1
                kn = k_lo + ((i0 + u + 1) % nsub) * SUBK      # z, s: one sub-tile ahead
                z1 = gl.load(z_base + kn // GROUP).to(gl.int32)
                s1 = gl.load(s_base + kn // GROUP).to(gl.float32)
                if XS:
                    xv = _xring_read(xring, (i0 + u) % ST, BLOCK_M)
                else:
                    xv = gl.load(x_base + ks, mask=x_mask, other=0.0)
                w = ring.index((i0 + u) % ST).load(LW)
                acc = acc + _sub_dot(w, z, xv, BLOCK_N, BLOCK_M, zero, CH) * gl.expand_dims(s, 1)
        cp.wait_group(0)
        return acc

    @gluon.jit
    def _pf_load(src, k, GROUP: gl.constexpr, EVICT: gl.constexpr, XL: gl.constexpr,
                 FM: gl.constexpr):
        """A register set: sub-tile k's ``_loads``; with XL the words, zeros and scales only
        (x is loaded when the set is used)."""
        if XL:
            w_base, z_base, s_base, xw_base, x_mask = src
            return _wzs_loads(w_base, z_base, s_base, k, GROUP, EVICT)
        else:
            return _loads(src, k, GROUP, EVICT, FM)

    @gluon.jit
    def _pf_step(acc, zero, st, src, k, xa, last, DT: gl.constexpr, BLOCK_N: gl.constexpr,
                 BLOCK_M: gl.constexpr, CH: gl.constexpr, XL: gl.constexpr, FM: gl.constexpr):
        """``acc`` plus one sub-tile (k) held in registers (``st`` from ``_pf_load``), and
        ``xa``. x's words for k: in ``st`` (XL 0), loaded here (XL 1), or ``xa`` (XL 2), which
        is then replaced by the next sub-tile's words (clamped to ``last``), loaded here."""
        if XL:
            w, z, s = st
            w_base, z_base, s_base, xw_base, x_mask = src
            if XL == 2:
                xw = xa
                xa = _xw_load(xw_base + gl.minimum(k + SUBK, last) // 2, x_mask, FM)
            else:
                xw = _xw_load(xw_base + k // 2, x_mask, FM)
        else:
            w, z, s, xw = st
        part = _sub_dot(w, z, _x_unpack(xw, DT, BLOCK_M), BLOCK_N, BLOCK_M, zero, CH)
        return acc + part * gl.expand_dims(s.to(gl.float32), 1), xa

    @gluon.jit
    def _pf_turn(acc, zero, st, src, k, kn, xa, last, DT: gl.constexpr, GROUP: gl.constexpr,
                 BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, CH: gl.constexpr,
                 EVICT: gl.constexpr, XL: gl.constexpr, FM: gl.constexpr):
        """``_pf_step`` on the sub-tile k in register set ``st``, and the set reloaded with
        sub-tile ``kn``."""
        acc, xa = _pf_step(acc, zero, st, src, k, xa, last, DT, BLOCK_N, BLOCK_M, CH, XL, FM)
        return acc, _pf_load(src, kn, GROUP, EVICT, XL, FM), xa

    @gluon.jit
    def _pf_acc(acc, zero, src, k_lo, nsub, DT: gl.constexpr, GROUP: gl.constexpr,
                BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, PF: gl.constexpr, CH: gl.constexpr,
                EVICT: gl.constexpr, XL: gl.constexpr, FM: gl.constexpr = False):
        """``acc`` plus the ``nsub`` sub-tiles from ``k_lo`` of ``src`` (``_loads``), one a
        step, with the next PF sub-tiles' loads in flight in registers (loads past the end are
        clamped to the last sub-tile: valid, unused). PF 2 / 3: three / four register sets used
        in turn, the loop unrolled 3 / 4 times so that no set is copied into another (as a
        rotation, the copies cost 50-70 moves a step). With XL the sets hold no x: XL 1 loads
        each step's x words (an L1/L2 hit) when it runs, XL 2 one step ahead (one set of x
        registers, ``xa``). FM: ``_xw_load``."""
        last = k_lo + (nsub - 1) * SUBK
        if XL == 2:
            xa = _xw_load(src[3] + k_lo // 2, src[4], FM)
        else:
            xa = k_lo                    # unused
        a = _pf_load(src, k_lo, GROUP, EVICT, XL, FM)
        if PF == 1:                      # (unrolled by 2 like PF 2 below, it was slower)
            for i in range(nsub):
                st = a
                a = _pf_load(src, gl.minimum(k_lo + (i + 1) * SUBK, last), GROUP, EVICT, XL, FM)
                acc, xa = _pf_step(acc, zero, st, src, k_lo + i * SUBK, xa, last, DT, BLOCK_N,
                                   BLOCK_M, CH, XL, FM)
        else:
            b = _pf_load(src, gl.minimum(k_lo + SUBK, last), GROUP, EVICT, XL, FM)
            if PF == 3:
                c = _pf_load(src, gl.minimum(k_lo + 2 * SUBK, last), GROUP, EVICT, XL, FM)
            for i in range(0, nsub - PF, PF + 1):
                k = k_lo + i * SUBK
                d = _pf_load(src, k + PF * SUBK, GROUP, EVICT, XL, FM)       # the set used last
                acc, a, xa = _pf_turn(acc, zero, a, src, k, gl.minimum(k + (PF + 1) * SUBK, last),
                                      xa, last, DT, GROUP, BLOCK_N, BLOCK_M, CH, EVICT, XL, FM)
                acc, b, xa = _pf_turn(acc, zero, b, src, k + SUBK,
                                      gl.minimum(k + (PF + 2) * SUBK, last), xa, last, DT, GROUP,
                                      BLOCK_N, BLOCK_M, CH, EVICT, XL, FM)
                if PF == 3:
                    acc, c, xa = _pf_turn(acc, zero, c, src, k + 2 * SUBK,
                                          gl.minimum(k + 6 * SUBK, last), xa, last, DT, GROUP,
                                          BLOCK_N, BLOCK_M, CH, EVICT, XL, FM)
                acc, xa = _pf_step(acc, zero, d, src, k + PF * SUBK, xa, last, DT, BLOCK_N,
                                   BLOCK_M, CH, XL, FM)
            r = nsub % (PF + 1)          # the remainder: in a, b (, c) already
            kr = k_lo + (nsub - r) * SUBK
            if r >= 1:
                acc, xa = _pf_step(acc, zero, a, src, kr, xa, last, DT, BLOCK_N, BLOCK_M, CH,
                                   XL, FM)
            if r >= 2:
                acc, xa = _pf_step(acc, zero, b, src, kr + SUBK, xa, last, DT, BLOCK_N, BLOCK_M,
                                   CH, XL, FM)
            if PF == 3:
                if r == 3:
                    acc, xa = _pf_step(acc, zero, c, src, kr + 2 * SUBK, xa, last, DT, BLOCK_N,
                                       BLOCK_M, CH, XL, FM)
        return acc

    @gluon.jit
    def _int4_gemv_gluon(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, fin_ptr, cnt_ptr, M, N, K, G,
                         stride_xm, stride_om, stride_fin, stride_qw, GROUP: gl.constexpr,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_M: gl.constexpr,
                         SPLIT_K: gl.constexpr, PF: gl.constexpr, ST: gl.constexpr,
                         XS: gl.constexpr, CH: gl.constexpr = 1, FIXUP: gl.constexpr = False,
                         EVICT: gl.constexpr = "", XL: gl.constexpr = False,
                         FM: gl.constexpr = False):
        NW: gl.constexpr = gl.num_warps()
        DT: gl.constexpr = x_ptr.dtype.element_ty
        NSUB: gl.constexpr = BLOCK_K // 128
        LW: gl.constexpr = _word_layout(BLOCK_N, NW)
        MMA: gl.constexpr = _mma_layout(NW, BLOCK_M)

        pid_n = gl.program_id(0)
        pid_k = gl.program_id(1)
        # weights: rows (clamped: loads stay in bounds) x physical words
        rows_w = (pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LW))) % N
        offs_p = gl.arange(0, 16, layout=gl.SliceLayout(0, LW))
        w_base = qw_ptr + gl.expand_dims(rows_w * stride_qw, 1) + gl.expand_dims(offs_p, 0)
        z_base = z_ptr + rows_w * G
        # x: physical word p, row m, code c
        x_base, x_mask = _x_ptrs(x_ptr, stride_xm, M, BLOCK_M)
        # scales: rows in the accumulator's layout
        offs_nc = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
        s_base = s_ptr + (offs_nc % N) * G
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        if ST > 0:                       # NSUB sub-tiles a step through the cp.async ring
            nsub = K // (SUBK * SPLIT_K)
            ring, xring, xc_base, xc_mask = _ring_alloc(x_ptr, stride_xm, M, x_base, x_mask, DT,
                                                        BLOCK_N, BLOCK_M, ST, XS)
            acc = _ring_acc(acc, zero, ring, xring, w_base, z_base, s_base, x_base, x_mask,
                            xc_base, xc_mask, pid_k * nsub * SUBK, nsub, GROUP, BLOCK_N,
                            BLOCK_M, NSUB, ST, XS, CH, EVICT)
        elif PF == 0:                      # loop over BLOCK_K blocks, NSUB sub-tiles unrolled
            nkb = K // (BLOCK_K * SPLIT_K)              # K blocks per split (loop over block
            kb_lo = pid_k * nkb                         # indices: ks stays a multiple of 128)
            for kb in range(kb_lo, kb_lo + nkb):
                for sub in gl.static_range(NSUB):
                    ks = kb * BLOCK_K + sub * SUBK
                    gi = ks // GROUP
                    w = gl.load(w_base + ks // 8, eviction_policy=EVICT)      # [BN, 16] int32
                    z = gl.load(z_base + gi).to(gl.int32)
                    xv = gl.load(x_base + ks, mask=x_mask, other=0.0)          # [16, BM, 8]
                    part = _sub_dot(w, z, xv, BLOCK_N, BLOCK_M, zero, CH)
                    s = gl.load(s_base + gi).to(gl.float32)
                    acc = acc + part * gl.expand_dims(s, 1)
        else:                            # one sub-tile a step, PF sub-tiles' loads in flight
            nsub = K // (SUBK * SPLIT_K)
            xw_base, xw_mask = _x_ptrs(x_ptr, stride_xm, M, BLOCK_M, True)
            acc = _pf_acc(acc, zero, (w_base, z_base, s_base, xw_base, xw_mask),
                          pid_k * nsub * SUBK, nsub, DT, GROUP, BLOCK_N, BLOCK_M, PF, CH, EVICT,
                          XL, FM)
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        write_tile(acc, out_ptr, cnt_ptr, fin_ptr, pid_n, pid_k, offs_nc, offs_m, pid_n * BLOCK_N,
                   0, M, N, stride_om, stride_fin, SPLIT_K, FIXUP)

def cfg(bn=64, bk=256, sk=1, nw=4, bm=16, pf=0, st=0, xs=False, ch=1, ev=False, ctas=0,
        xl=False, fm=False):
    """pf: 0 = BLOCK_K blocks with the sub-tiles unrolled; 1/2/3 = one sub-tile a step, that many
    sub-tiles' loads ahead in registers (BLOCK_K 128); xl (with pf): x not among them, loaded
    when its sub-tile is used (1) or one sub-tile ahead (2); fm (with pf; only for M = bm): x
    loaded without a mask. st > 0: bk // 128 sub-tiles a step, the weights through an st-slot
    cp.async ring (st >= 2 bk // 128); xs (with st): x through a ring too, not loaded by every
    warp. ch 2: each sub-tile as two independent mmas over its K halves. sk > 1: the K slices'
    partials are added by the tile's last program (splitk_gluon). ev: the weights are loaded
    with the L2 evict-first policy (they are read once). ctas (st or pf): stream-K, that many
    programs per SM sharing the K steps evenly (int_gemv_streamk.py)."""
    return {"BLOCK_N": bn, "BLOCK_K": 128 if pf else bk, "BLOCK_M": bm, "SPLIT_K": sk,
            "num_warps": nw, "PF": 0 if st else pf, "ST": st, "XS": bool(st and xs), "CH": ch,
            **({"EVICT": True} if ev else {}), **({"CTAS": ctas} if ctas else {}),
            **({"XL": int(xl)} if xl and pf and not st else {}),
            **({"FM": True} if fm and pf and not st else {})}


# The tuner's list (each config costs a compile and a timing at warm-up): the configs that won
# some (shape, M) of the Llama shapes on an H100 (benchmarks/gluon_gemv.py and, for the split
# ring configs and the evict-first loads, benchmarks/gemv_ceiling.py, 2026-11-27; split-K PF 2 / 3,
# benchmarks/gemv_ab.py on an H100 and the tuner on an H200; the last two, PF 3 with x loaded at
# use (BM 16) and unsplit PF 3 at BM 8, gemv_ab.py on an H100, 2026-11-27).
CONFIGS = [cfg(64, 256, sk=2), cfg(64, 256, sk=4), cfg(64, 128, sk=8), cfg(64, 256, sk=4, bm=8),
           cfg(64, 256, sk=4, bm=8, ev=True), cfg(128, sk=4, pf=1, ev=True),
           cfg(128, sk=2, pf=1, ev=True), cfg(128, pf=2), cfg(64, pf=2, bm=8, ev=True),
           cfg(64, sk=4, pf=2, bm=8), cfg(64, 256, sk=4, st=4), cfg(64, 128, st=4, bm=8, xs=True),
           cfg(128, 256, st=4, bm=8, xs=True), cfg(128, 256, st=4, xs=True),
           cfg(128, 128, st=4, xs=True), cfg(128, 256, sk=2, st=4, bm=8, xs=True),
           cfg(128, 256, sk=4, st=4, bm=8, xs=True), cfg(128, 256, sk=4, st=4, xs=True),
           cfg(128, sk=4, pf=2), cfg(128, sk=4, pf=2, bm=8), cfg(128, sk=4, pf=3, bm=8),
           cfg(128, pf=3, xl=True), cfg(128, pf=3, bm=8)]
# Tried, not offered to the tuner (none won; benchmarks/gluon_gemv.py --extra,
# benchmarks/gemv_ceiling.py; RESULTS.md):
EXTRA = [cfg(128, 512, st=8, xs=True), cfg(128, 512, st=8, bm=8, xs=True), cfg(64, 512, st=8, xs=True),
         cfg(128, 256, st=6, xs=True), cfg(128, 256, sk=2, st=4, xs=True), cfg(128, sk=4, pf=1),
         cfg(64, pf=2, bm=8), cfg(128, pf=2, ev=True)] + [
    cfg(128, 256, st=4, bm=8, xs=True, ch=2), cfg(128, 256, st=4, xs=True, ch=2), cfg(128, pf=2, ch=2),
    cfg(64, 256, sk=4, bm=8, ch=2), cfg(128, sk=4, pf=1, ch=2), cfg(64, 128, st=4, bm=8, xs=True, ch=2)] + [
    cfg(128, 256, st=4, bm=bm, xs=True, ctas=n) for bm in (8, 16) for n in (2, 3)] + [  # stream-K
    cfg(128, pf=2, bm=8), cfg(128, sk=2, pf=2), cfg(128, pf=2, nw=8, bm=8),             # PF probes
    cfg(64, sk=4, pf=2), cfg(64, sk=2, pf=2, bm=8)] + [
    cfg(64, pf=3, bm=8, ev=True), cfg(64, sk=4, pf=3, bm=8), cfg(64, sk=2, pf=3, bm=8),  # PF 3 probes
    cfg(128, pf=3), cfg(128, sk=4, pf=3)] + [                                           # XL
    cfg(128, pf=2, xl=True), cfg(128, sk=4, pf=3, bm=8, xl=True), cfg(64, pf=2, bm=8, xl=True),
    cfg(128, sk=4, pf=2, xl=True), cfg(128, pf=1, xl=True), cfg(128, sk=2, pf=3, xl=True),
    cfg(128, sk=4, pf=3, xl=True)] + [                                                  # stream-K
    cfg(128, pf=2, ctas=2), cfg(128, pf=3, xl=True, ctas=2), cfg(128, pf=3, bm=8, ctas=2),
    cfg(128, pf=2, bm=8, ctas=2), cfg(64, pf=2, bm=8, ctas=3, ev=True), cfg(128, pf=3, ctas=2)] + [
    cfg(128, pf=3, bm=8, ev=True), cfg(128, pf=3, bm=8, xl=True), cfg(128, sk=2, pf=3, bm=8)] + [
    # FM (x without a mask at M = BLOCK_M): 0.97-1.06x of the masked loads (gemv_ab.py, H100)
    cfg(128, pf=3, xl=True, fm=True), cfg(128, sk=4, pf=2, fm=True), cfg(128, pf=3, bm=8, fm=True),
    cfg(128, sk=4, pf=3, bm=8, fm=True)] + [
    # XL 2 (x one sub-tile ahead, one set of x registers): 0.91-1.77x of XL 1, no new best
    cfg(128, pf=3, xl=2), cfg(128, pf=2, xl=2), cfg(128, sk=4, pf=2, xl=2), cfg(128, pf=1, xl=2),
    cfg(128, sk=2, pf=3, xl=2), cfg(128, pf=3, bm=8, xl=2), cfg(128, sk=4, pf=3, bm=8, xl=2),
    cfg(128, pf=2, bm=8, xl=2), cfg(128, sk=4, pf=2, bm=8, xl=2), cfg(64, pf=3, bm=8, xl=2),
    cfg(128, pf=3, xl=2, fm=True), cfg(128, pf=3, bm=8, xl=2, fm=True),
    cfg(128, sk=4, pf=3, bm=8, xl=2, fm=True)] + [
    cfg(128, pf=1, nw=2, xl=True), cfg(128, sk=4, pf=1, nw=2, xl=True)] + [  # 64 rows a warp
    # 256 rows, 8 warps (x read once a sub-tile for 256 rows; one program an SM): no new best
    cfg(256, pf=3, nw=8, xl=True), cfg(256, pf=3, nw=8, xl=True, ctas=1),
    cfg(256, sk=4, pf=2, nw=8), cfg(256, sk=2, pf=3, nw=8, xl=True), cfg(256, pf=3, nw=8, bm=8),
    cfg(256, pf=3, nw=8, bm=8, ctas=1), cfg(256, sk=4, pf=3, nw=8, bm=8)]


def format_fits(spec, K: int) -> bool:
    """The weights both Gluon kernels take: 4-bit int, uint8 zeros, GROUP a multiple of 128
    dividing K."""
    g = K if spec.group_size == -1 else spec.group_size
    return (spec.fmt == "int" and spec.bits == 4 and not spec.sym and spec.zero_mode == "int"
            and g % SUBK_K == 0 and K % g == 0)


def valid(c: dict, M: int, N: int, K: int, spec) -> bool:
    """Whether config ``c`` runs these weights (``format_fits``) at this M, N, K."""
    g = K if spec.group_size == -1 else spec.group_size
    bn, bk, sk, nw = c["BLOCK_N"], c["BLOCK_K"], c["SPLIT_K"], c["num_warps"]
    return (format_fits(spec, K) and bk % SUBK_K == 0 and K % (bk * sk) == 0
            and g % min(bk, g) == 0 and (bk <= g or bk % g == 0)
            and bn % (16 * nw) == 0 and c["BLOCK_M"] in (8, 16) and M <= c["BLOCK_M"]
            and (c.get("ST", 0) == 0 or c["ST"] >= 2 * (bk // SUBK_K))
            and not (c.get("XS") and (nw != 4 or not c.get("ST")))
            and not ((c.get("XL") or c.get("FM")) and (c.get("ST") or not c.get("PF")))
            and not (c.get("FM") and (M != c["BLOCK_M"] or c.get("CTAS")))
            and not (c.get("CTAS") and (sk != 1 or not (c.get("ST") or c.get("PF"))
                                        or c.get("CH", 1) != 1)))


def launch(x, t, spec, N, K, c, out=None):
    """Run one config: x [M, K] (bf16/fp16, contiguous rows) -> out [M, N] in x.dtype."""
    import torch
    if c.get("PF") and (x.data_ptr() % 4 or x.stride(0) % 2):    # PF reads x as 32-bit words
        x = x.clone(memory_format=torch.contiguous_format)
    if c.get("CTAS"):
        from runtime.kernels import int_gemv_streamk
        return int_gemv_streamk.launch(x, t, spec, N, K, c, out)
    import triton
    from runtime.kernels.splitk import fused_counters, partials, sum_partials
    from runtime.kernels.common import prepare_gluon
    M, g, out = prepare_gluon(x, t, spec, N, K, c, out, valid, HAVE_GLUON)
    sk = c["SPLIT_K"]
    dst = partials(out, sk)                            # float32 [sk, M, N] when K is split
    tiles = triton.cdiv(N, c["BLOCK_N"])
    cnt = fused_counters({**c, "FIXUP": True}, x.device, tiles)   # None: not split (or capturing)
    _int4_gemv_gluon[(tiles, sk)](
        x, t["qweight"].view(torch.int32), t["scales"], t["zeros"], dst, out,
        dst if cnt is None else cnt, M, N, K, K // g, x.stride(0), dst.stride(-2), out.stride(0),
        K // 8, GROUP=g, BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_M=c["BLOCK_M"],
        SPLIT_K=sk, PF=c.get("PF", 0), ST=c.get("ST", 0), XS=bool(c.get("XS")),
        CH=c.get("CH", 1), FIXUP=cnt is not None,
        EVICT="evict_first" if c.get("EVICT") else "", XL=int(c.get("XL", 0)),
        FM=bool(c.get("FM")), num_warps=c["num_warps"])
    if cnt is None:
        sum_partials(dst, out)                         # partials added in a fixed order
    return out
