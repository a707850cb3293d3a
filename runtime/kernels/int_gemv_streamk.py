"""Stream-K for the Gluon int4 GEMV's ring and PF configs (int_gemv_gluon.py, ``ST`` > 0 or
``PF`` > 0): exactly ``CTAS`` programs per SM, each given the same number of K steps.

The work is ``T = cdiv(N, BLOCK_N)`` row tiles of ``S = K / BLOCK_K`` steps, ``U = T S`` units in
all, tile-major. Program ``p`` of ``P`` takes units ``[p U // P, (p + 1) U // P)``, so it may
end one tile part-way and start the next one. With a plain grid of T programs an SM gets
``ceil(T / SMs)`` or ``floor`` of them; on an H100 (132 SMs) the 224 tiles of 28672x8192 leave
some SMs twice the work of others (benchmarks/gemv_ceiling.py: the same kernel reached 73% of
HBM on 33792x8192, 264 tiles = 2 per SM, against 67% on 28672x8192).

A tile done by one program is stored directly. A tile split over programs ``first .. last``
(``owner(u)``: the program holding unit u) is finished as in splitk.py: each writes its
float32 partial to its own workspace slot (0: the tile it started in, 1: the tile it ended
in), a CTA barrier, an acq_rel arrival on the tile's counter; the last to arrive adds the
partials in the fixed order first .. last (the same bits whichever program arrives last),
writes the output and resets the counter.
"""
from __future__ import annotations

from runtime.kernels import int_gemv_gluon as V

HAVE_GLUON = V.HAVE_GLUON
if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def _finish(acc, ws_ptr, cnt_ptr, out_ptr, t, pid, first, last, slot, offs_n, offs_m, M, N,
                stride_om, U, P, S):
        """Partial ``acc`` of tile t from program ``pid`` (its workspace ``slot``); the last of
        programs first .. last to arrive writes their sum (in that order) to ``out``."""
        BN: gl.constexpr = acc.shape[0]
        BM: gl.constexpr = acc.shape[1]
        nl = gl.expand_dims(offs_n - t * BN, 1)                # row within the tile
        m = gl.expand_dims(offs_m, 0)
        mask = (m < M) & (nl >= 0)
        gl.store(ws_ptr + ((pid * 2 + slot) * BM + m) * BN + nl, acc, mask=mask)
        gl.thread_barrier()                                    # every thread's partial is written
        prev = gl.atomic_add(cnt_ptr + t, 1, sem="acq_rel", scope="gpu")
        if prev == last - first:
            tot = gl.zeros_like(acc)
            for q in range(first, last + 1):                   # fixed order: deterministic
                sq = ((q * U // P) // S != t).to(gl.int32)     # q's slot for this tile
                tot += gl.load(ws_ptr + ((q * 2 + sq) * BM + m) * BN + nl, mask=mask, other=0.0,
                               cache_modifier=".cg")
            gl.store(out_ptr + m * stride_om + gl.expand_dims(offs_n, 1),
                     tot.to(out_ptr.dtype.element_ty), mask=mask & (gl.expand_dims(offs_n, 1) < N))
            gl.atomic_xchg(cnt_ptr + t, 0, sem="relaxed", scope="gpu")

    @gluon.jit
    def _int4_gemv_streamk(x_ptr, qw_ptr, s_ptr, z_ptr, ws_ptr, out_ptr, cnt_ptr, M, N, K, G,
                           stride_xm, stride_om, stride_qw, T, S, P, GROUP: gl.constexpr,
                           BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_M: gl.constexpr,
                           ST: gl.constexpr, XS: gl.constexpr, EVICT: gl.constexpr,
                           PF: gl.constexpr = 0, XL: gl.constexpr = False):
        NW: gl.constexpr = gl.num_warps()
        DT: gl.constexpr = x_ptr.dtype.element_ty
        NSUB: gl.constexpr = BLOCK_K // 128
        LW: gl.constexpr = V._word_layout(BLOCK_N, NW)
        MMA: gl.constexpr = V._mma_layout(NW, BLOCK_M)
        pid = gl.program_id(0)
        U = T * S
        u0 = pid * U // P
        u1 = (pid + 1) * U // P
        offs_p = gl.arange(0, 16, layout=gl.SliceLayout(0, LW))
        x_base, x_mask = V._x_ptrs(x_ptr, stride_xm, M, BLOCK_M)
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, MMA))
        zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, MMA)
        if PF:                                                 # x as 32-bit words
            xw_base, xw_mask = V._x_ptrs(x_ptr, stride_xm, M, BLOCK_M, True)
        else:
            ring, xring, xc_base, xc_mask = V._ring_alloc(x_ptr, stride_xm, M, x_base, x_mask,
                                                          DT, BLOCK_N, BLOCK_M, ST, XS)
        for t in range(u0 // S, (u1 + S - 1) // S):            # the tiles this program touches
            a = gl.maximum(u0, t * S)
            b = gl.minimum(u1, t * S + S)
            rows_w = (t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LW))) % N
            w_base = qw_ptr + gl.expand_dims(rows_w * stride_qw, 1) + gl.expand_dims(offs_p, 0)
            offs_n = t * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, MMA))
            if PF:
                acc = V._pf_acc(zero, zero, (w_base, z_ptr + rows_w * G, s_ptr + (offs_n % N) * G,
                                             xw_base, xw_mask), (a - t * S) * BLOCK_K, b - a,
                                DT, GROUP, BLOCK_N, BLOCK_M, PF, 1, EVICT, XL)
            else:
                acc = V._ring_acc(zero, zero, ring, xring, w_base, z_ptr + rows_w * G,
                                  s_ptr + (offs_n % N) * G, x_base, x_mask, xc_base, xc_mask,
                                  (a - t * S) * BLOCK_K, (b - a) * NSUB, GROUP, BLOCK_N, BLOCK_M,
                                  NSUB, ST, XS, 1, EVICT)
            first = ((t * S + 1) * P - 1) // U                 # owner(t S)
            last = ((t * S + S) * P - 1) // U                  # owner(t S + S - 1)
            if first == last:                                  # the whole tile: store it
                gl.store(out_ptr + gl.expand_dims(offs_m, 0) * stride_om + gl.expand_dims(offs_n, 1),
                         acc.to(out_ptr.dtype.element_ty),
                         mask=(gl.expand_dims(offs_m, 0) < M) & (gl.expand_dims(offs_n, 1) < N))
            else:
                _finish(acc, ws_ptr, cnt_ptr, out_ptr, t, pid, first, last,
                        (u0 // S != t).to(gl.int32), offs_n, offs_m, M, N, stride_om, U, P, S)


def owner(u: int, U: int, P: int) -> int:
    """The program holding unit u when U units go to P programs as ``[p U // P, (p + 1) U // P)``
    (the kernel's formula, for tests)."""
    return ((u + 1) * P - 1) // U


def programs(c: dict, N: int, K: int, device) -> int:
    """P: ``CTAS`` per SM, at most one per unit."""
    import torch
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(c["CTAS"] * sms, -(-N // c["BLOCK_N"]) * (K // c["BLOCK_K"]))


def launch(x, t, spec, N, K, c, out=None):
    """Run one stream-K config: x [M, K] (bf16/fp16) -> out [M, N] in x.dtype."""
    import torch
    from runtime.kernels.common import prepare_gluon
    from runtime.kernels.splitk import counters
    M, g, out = prepare_gluon(x, t, spec, N, K, c, out, V.valid, HAVE_GLUON)
    T, S = -(-N // c["BLOCK_N"]), K // c["BLOCK_K"]
    P = programs(c, N, K, x.device)
    ws = torch.empty(P * 2 * c["BLOCK_M"] * c["BLOCK_N"], device=x.device, dtype=torch.float32)
    _int4_gemv_streamk[(P,)](
        x, t["qweight"].view(torch.int32), t["scales"], t["zeros"], ws, out, counters(x.device, T),
        M, N, K, K // g, x.stride(0), out.stride(0), K // 8, T, S, P, GROUP=g,
        BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_M=c["BLOCK_M"], ST=c["ST"],
        XS=bool(c.get("XS")), EVICT="evict_first" if c.get("EVICT") else "", PF=c.get("PF", 0),
        XL=int(c.get("XL", 0)), num_warps=c["num_warps"])
    return out
