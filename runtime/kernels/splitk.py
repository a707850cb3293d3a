"""Split-K partial sums finished inside the kernel, deterministically ("fused fixup").

A split-K GEMV/GEMM splits K over SPLIT_K programs per output tile. Without a fixup each writes
a float32 partial to a ``[SPLIT_K, M, N]`` buffer and a second kernel (``torch.sum``) adds them;
for a 20 us GEMV that launch and its gap cost ~3 us. Here every program stores its partial,
then arrives on a per-tile counter; the program that arrives last (whichever it is) reads the
SPLIT_K partials back in the fixed order 0, 1, ..., adds them in float32, writes the tile in the
output dtype and resets the counter to 0. The sum does not depend on which program came last,
so results are bit-identical from run to run (no float atomics).

Memory ordering follows the usual semaphore pattern: all threads' partial stores, a CTA
barrier, then one acq_rel atomic per program (triton performs a scalar atomic once per program);
the last program's loads of the partials bypass L1 (``.cg``), which is not coherent.

Counters (``counters``) are one int32 buffer per device, zero between launches (each launch
leaves it zeroed). Two launches using it must not run concurrently on one device: exa computes
on one stream per device (copies run on another stream, matmuls never do).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict = {}


@triton.jit
def finish_tile(res, ws_ptr, cnt_ptr, out_ptr, tile, pid_k, offs_m, offs_n, M, N, stride_om,
                SPLIT_K: tl.constexpr):
    """Store partial ``res`` [BN, BM] (float32; rows offs_n of N, columns offs_m of M) of split
    ``pid_k``; the last of the SPLIT_K programs of ``tile`` writes the sum to ``out``
    (``out[m, n]`` at ``m * stride_om + n``) and resets ``cnt_ptr[tile]``."""
    on = offs_n[:, None]
    om = offs_m[None, :]
    mask = (om < M) & (on < N)
    tl.store(ws_ptr + pid_k * M * N + om * N + on, res, mask=mask)
    tl.debug_barrier()                                  # every thread's partial is written
    prev = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if prev == SPLIT_K - 1:
        acc = tl.zeros(res.shape, dtype=tl.float32)
        for k in tl.static_range(SPLIT_K):             # fixed order: deterministic
            acc += tl.load(ws_ptr + k * M * N + om * N + on, mask=mask, other=0.0,
                           cache_modifier=".cg")
        tl.store(out_ptr + om * stride_om + on, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


def partials(out: torch.Tensor, split_k: int) -> torch.Tensor:
    """Where a launch with ``split_k`` slices of K writes: ``out`` itself (``[M, N]``) when
    ``split_k`` is 1, else a float32 ``[split_k, M, N]`` buffer for ``sum_partials``."""
    if split_k == 1:
        return out
    return torch.empty(split_k, *out.shape, device=out.device, dtype=torch.float32)


def sum_partials(dst: torch.Tensor, out: torch.Tensor) -> None:
    """Add the partials of ``partials`` into ``out`` in a fixed order (no-op when ``dst`` is
    ``out``); the separate-kernel alternative to ``finish_tile``."""
    if dst is not out:
        out.copy_(dst.sum(0))


def fused_counters(cfg: dict, device: torch.device, n_tiles: int) -> torch.Tensor | None:
    """The counters for a config that asks for the fused fixup (``FIXUP`` and ``SPLIT_K`` > 1),
    else None; None too on a first use inside a graph capture (the caller then sums the partials
    afterwards, as without FIXUP)."""
    if cfg.get("SPLIT_K", 1) < 2 or not cfg.get("FIXUP"):
        return None
    try:
        return counters(device, n_tiles)
    except RuntimeError:
        return None


def counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed int32 tile counters, at least ``n`` of them. Grown (reallocated) only
    outside CUDA-graph capture; during a capture a missing or short buffer raises RuntimeError
    (callers fall back to the unfused sum)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-K counters cannot be allocated during graph capture")
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf
