"""The cost model: predicted step times per phase, and the hybrid CPU/GPU choice. PURE.

A *phase* is a decode step (``batch`` tokens) or a prefill (``batch x prompt`` tokens). In a
phase every block is either computed on the compute device -- resident, or streamed to it
(``tier != compute tier``) -- or, for a pinned-RAM layer block on cuda, computed on the host
CPU where its weights already live (the set ``on_cpu``; llama.cpp's split at batch 1):

* link     ``transfer = max(bytes streamed from RAM or disk / h2d, bytes from disk / disk)``
           (streamed = not resident and not in ``on_cpu``; one pass over them per step);
* device   ``compute  = max(bytes of the device-computed blocks / device_mem,
                            tokens x their flops / device_flops,
                            layer_issue x their layer blocks)`` (embed rows: not counted);
           the last term is the host issuing eager kernels (~50 per layer) ahead of the GPU,
           which bounds resident-heavy decode (see runtime/launch_probe.py);
* host     ``cpu      = sum over on_cpu of (max(nbytes / cpu_mem, tokens x flops / cpu_flops)
                        + HOST_SYNC_S)``  (activations to the host and back, one sync per linear);
* step     ``total    = max(transfer, compute) + cpu + LAUNCH_OVERHEAD_S x blocks``.

An embed block looked up on the host in every phase (``Placement.host_compute``) is in
``on_cpu`` too, charged ``HOST_EMBED_S`` (one round trip), not ``nbytes / cpu_mem``: a lookup
reads only the input tokens' rows.

Streaming overlaps device compute (the ring), but not the CPU blocks: measured on an H200
host (PCIe 55 GB/s, 32 cores, CPU int4 GEMV 119 GB/s), 8 Llama-7B-shaped int4 layers with 3
computed on the CPU and 5 streamed took 16.1 ms per token, what ``max(transfer, compute) +
cpu`` predicts (16.3 ms), not ``max(transfer, compute + cpu)`` (9.9 ms): the small upload of
each CPU result queues behind the block copies on the copy engine, and both read host RAM.
``HOST_SYNC_S`` is fitted there too (all 8 on the CPU: 17.2 ms measured, 17.5 predicted).
So a block goes to the CPU when its CPU time beats its link time -- at batch 1 on a link slow
next to the host's RAM (PCIe 3/4 desktops, shared links) -- and the flops term sends it back
to the link as tokens grow (large batches, prefill). Host RAM bandwidth shared between PCIe
reads and CPU matmuls is not modelled further.

``choose_cpu`` tries k = 0 .. n CPU blocks (evenly spread over the candidates: pinned-RAM layer
blocks, as their extra bytes fit the budgets left) and keeps the fastest predicted step, if it
beats streaming only by ``HYBRID_MIN_GAIN``. CPU rates of 0 mean "not measured": the auto
choice then never computes on the CPU, and a forced choice predicts an unknown (infinite) time.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Sequence

from runtime.units import fmt_bytes

__all__ = ["Bandwidths", "PhaseCost", "phase_cost", "best_cpu", "choose_cpu", "cpu_sets", "spread", "bound",
           "LAUNCH_OVERHEAD_S", "HOST_SYNC_S", "HOST_EMBED_S", "HYBRID_MIN_GAIN"]

LAUNCH_OVERHEAD_S = 20e-6      # per block per step: kernel launches, hooks, events
HOST_SYNC_S = 1.25e-3          # per CPU-computed block per step: ~7 syncs (D2H, H2D), each draining
                               # the GPU queue of eager launches (measured: 7B-shaped layer, H200 host)
HOST_EMBED_S = HOST_SYNC_S / 7  # per step for an embedding looked up on the host: one round trip
                                # (ids to the host, rows back), not nbytes / cpu_mem (rows only)
HYBRID_MIN_GAIN = 0.03         # hybrid must beat streaming only by 3% to be chosen
CPU_COMPUTE_MODES = ("auto", "never", "always")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class Bandwidths:
    """Measured rates in bytes/s (flop/s for the ``*_flops``); see runtime/hardware.py.

    ``cpu_mem`` / ``cpu_flops`` are what the host CPU's quantized matmul achieves (weights read
    per second at one token; flop/s at many tokens); 0 = not measured (no hybrid choice).
    """

    h2d: float           # pinned host->GPU copy (0 when there is no GPU)
    disk: float          # disk sequential read
    device_mem: float    # memory bandwidth of the compute device (HBM, or RAM on cpu)
    device_flops: float  # dense matmul throughput of the compute device
    cpu_mem: float = 0.0     # host RAM bytes/s read by the CPU matmul kernel (GEMV)
    cpu_flops: float = 0.0   # CPU matmul flop/s at many tokens
    layer_issue: float = 0.0  # seconds the host takes to issue one layer's eager kernels (0 = not measured)

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            _check(v >= 0, f"bandwidths.{k}={v!r} must be >= 0")

    @property
    def has_cpu(self) -> bool:
        """Whether the CPU rates were measured (both > 0)."""
        return self.cpu_mem > 0 and self.cpu_flops > 0


@dataclass(frozen=True)
class PhaseCost:
    """Predicted seconds of one phase (see the module docstring)."""

    transfer_s: float   # link: host->GPU and disk reads of the streamed blocks
    compute_s: float    # compute device: the blocks it computes
    cpu_s: float        # host CPU: the blocks computed there, sync included
    total_s: float      # max(transfer, compute) + cpu + launch overhead


def _div(amount: float, rate: float, what: str) -> float:
    if amount == 0:
        return 0.0
    _check(rate > 0, f"bandwidths.{what} is 0 but this placement needs it")
    return amount / rate


def _cpu_block_s(b, tokens: int, bw: Bandwidths) -> float:
    if b.kind == "embed":          # a lookup reads only the rows of the input tokens
        return HOST_EMBED_S
    if not bw.has_cpu:
        return math.inf
    return max(b.nbytes / bw.cpu_mem, tokens * b.flops_per_token / bw.cpu_flops) + HOST_SYNC_S


def link_times(blocks: Sequence, tiers: Sequence[str], device: str, bw: Bandwidths,
               on_cpu: frozenset = frozenset()) -> tuple[float, float]:
    """(host->GPU seconds, disk seconds) for one pass over the blocks streamed in a phase."""
    ram = sum(b.nbytes for b, t in zip(blocks, tiers) if t == "cpu" and b.name not in on_cpu)
    disk = sum(b.nbytes for b, t in zip(blocks, tiers) if t == "disk")
    h2d = _div(ram + disk, bw.h2d, "h2d") if device == "cuda" else 0.0
    return h2d, _div(disk, bw.disk, "disk")


def device_times(blocks: Sequence, bw: Bandwidths, tokens: int,
                 on_cpu: frozenset = frozenset()) -> tuple[float, float, float]:
    """(memory seconds, flop seconds, host issue seconds) of the blocks the compute device runs."""
    mine = [b for b in blocks if b.name not in on_cpu]
    # An embedding lookup reads only the rows it needs, not the whole table.
    mem = _div(sum(b.nbytes for b in mine if b.kind != "embed"), bw.device_mem, "device_mem")
    issue = bw.layer_issue * sum(1 for b in mine if b.kind == "layer")
    return mem, _div(tokens * sum(b.flops_per_token for b in mine), bw.device_flops, "device_flops"), issue


def phase_cost(blocks: Sequence, tiers: Sequence[str], device: str, bw: Bandwidths, tokens: int,
               on_cpu: frozenset = frozenset()) -> PhaseCost:
    """Predicted time of one phase of ``tokens`` tokens with ``on_cpu`` computed on the host."""
    transfer = max(link_times(blocks, tiers, device, bw, on_cpu))
    compute = max(device_times(blocks, bw, tokens, on_cpu))
    cpu = sum(_cpu_block_s(b, tokens, bw) for b in blocks if b.name in on_cpu)
    total = max(transfer, compute) + cpu + LAUNCH_OVERHEAD_S * len(blocks)
    return PhaseCost(transfer, compute, cpu, total)


def bound(cost: PhaseCost, blocks, tiers, device, bw, tokens, on_cpu=frozenset()) -> str:
    """What limits a phase: "host->GPU copy", "disk read", "host CPU", "memory bandwidth", "compute",
    "kernel launches" (the host issuing eager kernels)."""
    if cost.cpu_s > max(cost.transfer_s, cost.compute_s):
        return "host CPU"
    if cost.transfer_s > cost.compute_s:
        h2d, disk = link_times(blocks, tiers, device, bw, on_cpu)
        return "disk read" if disk >= h2d else "host->GPU copy"
    mem, flops, issue = device_times(blocks, bw, tokens, on_cpu)
    if issue > max(mem, flops):
        return "kernel launches"
    return "memory bandwidth" if mem >= flops else "compute"


def spread(items: Sequence, k: int) -> list:
    """``k`` of ``items`` evenly spaced, always including the last one (k <= len(items)).

    CPU blocks interleaved with streamed ones keep copies in flight while the CPU works (the
    model counts no overlap, see above; any the hardware finds is a bonus), and the first
    streamed blocks -- in flight across a prefill -> decode switch -- stay streamed unless
    k > n / 2."""
    n = len(items)
    return [items[(j + 1) * n // k - 1] for j in range(k)] if k else []


def best_cpu(blocks: Sequence, tiers: Sequence[str], device: str, bw: Bandwidths, tokens: int,
             candidates: Sequence, host_room: int, device_room: int,
             fixed: frozenset = frozenset()) -> tuple[frozenset, float]:
    """The fastest non-empty set of ``candidates`` (BlockSpecs, in execution order) to compute
    on the CPU, and its step time; ``(frozenset(), inf)`` when no set applies.

    Tries k = 1 .. len(candidates) evenly spread blocks whose extra pinned bytes
    (``cpu_extra``) fit ``host_room`` and whose device copies (``cpu_small``) fit ``device_room``.
    ``fixed``: blocks computed on the host in every case (the host embedding), counted in each time.
    """
    best, best_s = frozenset(), math.inf
    if device != "cuda" or not bw.has_cpu:
        return best, best_s
    for k in range(1, len(candidates) + 1):
        chosen = spread(candidates, k)
        if sum(b.cpu_extra for b in chosen) > host_room or sum(b.cpu_small for b in chosen) > device_room:
            continue
        names = frozenset(b.name for b in chosen)
        t = phase_cost(blocks, tiers, device, bw, tokens, names | fixed).total_s
        if t < best_s:
            best, best_s = names, t
    return best, best_s


def choose_cpu(blocks: Sequence, tiers: Sequence[str], device: str, bw: Bandwidths, tokens: int,
               candidates: Sequence, host_room: int, device_room: int, fixed: frozenset = frozenset()) -> frozenset:
    """``best_cpu``'s set if it beats streaming only by HYBRID_MIN_GAIN, else the empty set."""
    best, best_s = best_cpu(blocks, tiers, device, bw, tokens, candidates, host_room, device_room, fixed)
    base = phase_cost(blocks, tiers, device, bw, tokens, fixed).total_s
    return best if best_s <= base * (1 - HYBRID_MIN_GAIN) else frozenset()


def cpu_sets(p, how) -> tuple[frozenset, frozenset]:
    """(decode, prefill) sets of blocks of Placement ``p`` (planned streaming only) to compute
    on the CPU, for ``how`` (see ``runtime.planner.plan``'s ``cpu_compute``)."""
    if how in ("never", None, False):
        return frozenset(), frozenset()
    eligible = p.cpu_candidates()
    host_room, device_room = p.cpu_rooms()
    if how == "auto":
        wl = p.workload
        decode = choose_cpu(p.blocks, p.tiers, p.device, p.bandwidths, wl.batch, eligible,
                            host_room, device_room, p.host_compute)
        mine = [b for b in eligible if b.name in decode]     # prefill: a subset, so budgets hold
        return decode, choose_cpu(p.blocks, p.tiers, p.device, p.bandwidths, wl.batch * wl.prompt,
                                  mine, host_room, device_room, p.host_compute)
    if isinstance(how, str) and how != "always":
        raise ValueError(f"cpu_compute={how!r} must be one of {CPU_COMPUTE_MODES} or a list of block names")
    if how == "always":
        chosen = eligible
    else:
        patterns = list(how)
        _check(all(isinstance(x, str) for x in patterns), f"cpu_compute={how!r}: names must be strings")
        names = [b.name for b in p.blocks]
        for pat in patterns:
            _check(bool(fnmatch.filter(names, pat)), f"cpu_compute: {pat!r} matches no block")
        chosen = [b for b in p.blocks if any(fnmatch.fnmatchcase(b.name, x) for x in patterns)]
        bad = [b.name for b in chosen if b not in eligible]
        _check(not bad, f"cpu_compute: {bad[:3]} cannot be computed on the CPU (only layer blocks "
                        "homed in pinned RAM on cuda, whose big tensors are linears)")
    for what, need, room, budget in (("pinned host RAM", sum(b.cpu_extra for b in chosen), host_room, "cpu"),
                                     ("device memory", sum(b.cpu_small for b in chosen), device_room, "device")):
        if need > room:
            from runtime.placement import PlanError
            raise PlanError(f"cpu_compute={how!r}: {fmt_bytes(need)} more {what} is needed for the "
                            f"CPU-computed blocks, {fmt_bytes(max(room, 0))} is left", need,
                            getattr(p.budgets, budget), budget)
    return frozenset(b.name for b in chosen), frozenset()
