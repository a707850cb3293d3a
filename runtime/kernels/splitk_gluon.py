"""The fused split-K fixup of ``splitk.py`` for Gluon kernels: the same protocol, written with
Gluon's ops (a Gluon kernel cannot call a ``triton.jit`` function).

Every program of a split tile stores its float32 partial into the ``[SPLIT_K, M, N]``
workspace, all its threads meet at a barrier, and one acq_rel atomic per program counts the
arrivals; the last to arrive reads the SPLIT_K partials back (``.cg``: past the non-coherent L1)
in the fixed order 0, 1, ..., writes their sum in the output dtype and resets the counter. The
result does not depend on which program came last (no float atomics).
"""
from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    HAVE_GLUON = True
except Exception:                                      # pragma: no cover - depends on triton
    HAVE_GLUON = False


if HAVE_GLUON:
    @gluon.jit
    def finish_tile(res, ws_ptr, cnt_ptr, out_ptr, tile, pid_k, offs_n, offs_m, n0, m0, M, N,
                    stride_om, SPLIT_K: gl.constexpr):
        """Partial ``res [BN, BM]`` (float32; rows ``offs_n`` of N, columns ``offs_m`` of M, in
        the slice layouts of ``res``'s layout; the tile starts at row n0, column m0) of split
        ``pid_k``; the last of the tile's SPLIT_K programs writes the sum to ``out[m, n]`` (at
        ``m * stride_om + n``) and zeroes ``cnt_ptr[tile]``. The sum runs over column chunks of
        at most 32 values a thread, so it needs few registers beside the kernel's own."""
        BN: gl.constexpr = res.shape[0]
        BM: gl.constexpr = res.shape[1]
        NW: gl.constexpr = gl.num_warps()
        CH: gl.constexpr = BM if BM * BN <= 1024 * NW else 1024 * NW // BN
        mask = (gl.expand_dims(offs_m, 0) < M) & (gl.expand_dims(offs_n, 1) < N)
        gl.store(ws_ptr + pid_k * M * N + gl.expand_dims(offs_m, 0) * N
                 + gl.expand_dims(offs_n, 1), res, mask=mask)
        gl.thread_barrier()                            # every thread's partial is written
        prev = gl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if prev == SPLIT_K - 1:
            L: gl.constexpr = gl.BlockedLayout([4, 1], [32, 1], [1, NW], [0, 1])   # n contiguous
            on = gl.expand_dims(n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, L)), 1)
            for h in gl.static_range(BM // CH):
                om = gl.expand_dims(m0 + h * CH + gl.arange(0, CH, layout=gl.SliceLayout(0, L)), 0)
                m = (om < M) & (on < N)
                acc = gl.zeros([BN, CH], gl.float32, L)
                for k in gl.static_range(SPLIT_K):     # fixed order: deterministic
                    acc += gl.load(ws_ptr + k * M * N + om * N + on, mask=m, other=0.0,
                                   cache_modifier=".cg")
                gl.store(out_ptr + om * stride_om + on, acc.to(out_ptr.dtype.element_ty), mask=m)
            gl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")

    @gluon.jit
    def write_tile(res, out_ptr, cnt_ptr, fin_ptr, tile, pid_k, offs_n, offs_m, n0, m0, M, N,
                   stride_om, stride_fin, SPLIT_K: gl.constexpr, FIXUP: gl.constexpr):
        """A Gluon kernel's result tile ``res [BN, BM]``: with FIXUP, ``finish_tile`` (``out_ptr``
        the float32 workspace, ``fin_ptr`` the output); else stored masked into ``out[m, n]`` in
        out's dtype, at ``pid_k * M * stride_om + m * stride_om + n`` (the output, or with split K
        partial ``pid_k``, summed afterwards)."""
        if FIXUP:
            finish_tile(res, out_ptr, cnt_ptr, fin_ptr, tile, pid_k, offs_n, offs_m, n0, m0, M, N,
                        stride_fin, SPLIT_K)
        else:
            o_ptrs = (out_ptr + pid_k * M * stride_om + gl.expand_dims(offs_m, 0) * stride_om
                      + gl.expand_dims(offs_n, 1))
            o_mask = (gl.expand_dims(offs_m, 0) < M) & (gl.expand_dims(offs_n, 1) < N)
            gl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=o_mask)
