"""The placement planner: (block sizes, budgets, bandwidths, workload) -> a frozen Placement.

PURE: no torch, no I/O. Every block gets a home tier: resident on the compute device ("gpu"
on cuda, "cpu" on the CPU) or streamed from pinned host RAM ("cpu", cuda only) or "disk"
through a ring of ``slots`` device buffers of ``slot_bytes`` each. The planned device bytes
(resident + slots + KV cache + activations + overhead) never exceed ``budgets.device``: the
"no OOM at run time" promise. Predictions come from runtime/cost_model.py: a decode step
reads every weight once and streamed bytes cross the link every step. On cuda, per phase, some
pinned-RAM layer blocks may instead be computed on the host CPU (``cpu_compute``; hybrid
execution, chosen by the cost model from measured PCIe and CPU rates and the batch).
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from typing import Collection, Mapping, Sequence

from runtime.cost_model import cpu_sets, spread
from runtime.placement import (Bandwidths, BlockSpec, Budgets, Placement, PlanError, Workload, _allowed_tiers,
                               _check, _is_count, _nslots)
from runtime.units import MiB, fmt_bytes

__all__ = ["BlockSpec", "Bandwidths", "Budgets", "Workload", "Placement", "PlanError", "plan"]

CUDA_MIN_OVERHEAD = 512 * MiB        # CUDA context, allocator fragmentation, workspaces ...
CUDA_OVERHEAD_DIVISOR = 20           # ... or 5% of the device budget, whichever is larger
CPU_OVERHEAD = 64 * MiB
DEFAULT_PREFETCH_DEPTH = 2
MODES = ("auto", "none", "cpu", "disk")


# -- planning ----------------------------------------------------------------------------
def plan(blocks: Sequence[BlockSpec], budgets: Budgets, bandwidths: Bandwidths,
         workload: Workload = Workload(), device: str = "cuda",
         mode: str | Mapping[str, str] = "auto", prefetch_depth: int | None = None,
         cpu_compute: str | Collection[str] = "auto") -> Placement:
    """Place every block on a tier so that the device budget is never exceeded.

    Args:
        blocks: the model's blocks in execution order (unique names).
        budgets: bytes allowed on the device, in pinned host RAM and on disk.
        bandwidths: rates for the predictions; ``h2d`` must be > 0 on cuda when anything is
            streamed, ``disk`` > 0 when anything lives on disk.
        workload: batch / context / prompt sizes; sizes the KV cache and activations.
        device: "cuda" (or "cuda:N") or "cpu".
        mode: "auto" (embed/head resident, then as many layers as fit, spread evenly among
            the streamed ones so that their compute hides behind the copies; the rest
            streamed from pinned RAM up to its budget, then disk; on cuda, when not every
            block fits, an embed block with ``cpu_ok`` stays in pinned RAM instead, looked up
            on the host in every phase: ``Placement.host_compute``), "none" (everything
            resident), "cpu" / "disk" (every layer streamed from that tier), or a dict of
            block name or fnmatch pattern ("layers.*") -> tier. An exact name wins over a
            pattern, a later pattern over an earlier one; unnamed blocks are placed as "auto".
        prefetch_depth: blocks loaded ahead of the one computing; default 2, or 1 when only
            two slots fit. 0 in the result when nothing is streamed.
        cpu_compute: which pinned-RAM layer blocks (cuda only) are computed on the host CPU
            instead of streamed: "auto" (per phase, the set the cost model predicts fastest;
            none when ``bandwidths`` has no CPU rates), "never", "always" (every eligible one,
            in decode steps), or block names / fnmatch patterns (those, in decode steps).
            Their CPU-kernel copies (``cpu_extra``) must fit the pinned host budget left over
            and their small tensors (``cpu_small``) the device budget left over.

    Returns:
        A frozen :class:`Placement`.

    Raises:
        PlanError: the budgets cannot hold the model this way; the message says how much is
            needed. ValueError: a bad mode, tier, pattern, device, depth or cpu_compute.
    """
    blocks = tuple(blocks)
    _check(bool(blocks) and all(isinstance(b, BlockSpec) for b in blocks),
           "blocks must be a non-empty list of BlockSpec")
    names = [b.name for b in blocks]
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"block names appear twice: {dup}")
    _check(device == "cpu" or bool(re.fullmatch(r"cuda(:\d+)?", str(device))),
           f"device={device!r} must be 'cuda', 'cuda:N' or 'cpu'")
    device = "cpu" if device == "cpu" else "cuda"
    _check(prefetch_depth is None or (_is_count(prefetch_depth) and prefetch_depth >= 1),
           f"prefetch_depth={prefetch_depth!r} must be an int >= 1")
    depths = (DEFAULT_PREFETCH_DEPTH, 1) if prefetch_depth is None else (prefetch_depth,)
    forced = _forced_tiers(blocks, mode, device)
    kv = workload.batch * workload.context * workload.kv_bytes_per_token
    act = workload.batch * workload.prompt * workload.act_bytes_per_token
    overhead = CPU_OVERHEAD if device == "cpu" else max(CUDA_MIN_OVERHEAD, budgets.device // CUDA_OVERHEAD_DIVISOR)
    res_tier = "gpu" if device == "cuda" else "cpu"
    avail = budgets.device - kv - act - overhead
    first = resident, depth, cheapest = _choose_resident(blocks, forced, res_tier, avail, depths)
    host = _host_embeds(blocks, forced, device) if resident is None or len(resident) < len(blocks) else set()
    if host:            # not everything fits: the embedding stays in pinned RAM, looked up there
        rest = [b for b in blocks if b.name not in host]
        got = _choose_resident(rest, forced, res_tier, avail, depths)
        if got[0] is not None and sum(b.nbytes for b in blocks if b.name in host) <= budgets.cpu:
            resident, depth, cheapest = got
        else:
            host = set()
    if resident is None:
        how = "to hold every block resident" if mode == "none" else f"with offload={mode!r}" + \
            (f" and prefetch_depth={prefetch_depth}" if prefetch_depth is not None else "")
        raise _too_small(device, budgets.device, kv, act, cheapest, how)
    try:
        depth = depth if len(resident) + len(host) < len(blocks) else 0
        tiers = _offload_tiers(blocks, {**forced, **dict.fromkeys(host, "cpu")}, resident, device, budgets,
                               depth, host)
    except PlanError:
        if not host or first[0] is None:
            raise
        (resident, depth, _), host = first, set()      # pinned RAM too small for it: as before
        depth = depth if len(resident) < len(blocks) else 0
        tiers = _offload_tiers(blocks, forced, resident, device, budgets, depth)
    host = frozenset(host)
    p = Placement(device, blocks, tiers, depth, kv, act, overhead, budgets, bandwidths, workload,
                  host_compute=host)
    decode, prefill = cpu_sets(p, cpu_compute)
    if not decode and not prefill:
        return p
    return Placement(device, blocks, tiers, depth, kv, act, overhead, budgets, bandwidths, workload,
                     decode, prefill, host)


def _host_embeds(blocks, forced, device: str) -> set[str]:
    """Embed blocks looked up on the host (cuda, placed automatically, ``cpu_ok``): an embedding
    lookup reads only the input tokens' rows, so the table need not be resident or streamed."""
    if device != "cuda":
        return set()
    return {b.name for b in blocks if b.kind == "embed" and b.cpu_ok and b.name not in forced}


def _forced_tiers(blocks: tuple[BlockSpec, ...], mode, device: str) -> dict[str, str]:
    """Tiers fixed by ``mode``; blocks absent from the result are placed automatically."""
    if not isinstance(mode, Mapping):
        _check(mode in MODES, f"offload mode {mode!r} is not one of {MODES} or a dict of block -> tier")
        if mode == "none":
            return {b.name: "gpu" if device == "cuda" else "cpu" for b in blocks}
        return {b.name: mode for b in blocks if b.kind == "layer"} if mode in ("cpu", "disk") else {}
    names = [b.name for b in blocks]
    exact, patterns = {}, {}
    for key, tier in mode.items():
        _check(tier in _allowed_tiers(device),
               f"offload[{key!r}] = {tier!r}: tier must be one of {_allowed_tiers(device)} on {device}")
        _check(key in names or bool(fnmatch.filter(names, key)),
               f"offload key {key!r} matches no block (blocks: {names[0]} ... {names[-1]})")
        (exact if key in names else patterns)[key] = tier
    out = {n: tier for pattern, tier in patterns.items() for n in fnmatch.filter(names, pattern)}
    return {**out, **exact}


def _prefix_costs(fixed: int, streamed: list[int], layers: list[int], depth: int) -> list[int]:
    """Device bytes when layers[:r] are resident and layers[r:] + streamed are streamed, r = 0..n."""
    costs, tail_max, tail = [0] * (len(layers) + 1), max(streamed, default=0), len(streamed)
    prefix = list(itertools.accumulate(layers, initial=0))
    for r in range(len(layers), -1, -1):
        if r < len(layers):
            tail_max, tail = max(tail_max, layers[r]), tail + 1
        costs[r] = fixed + prefix[r] + min(depth + 1, tail) * tail_max
    return costs


def _choose_resident(blocks, forced, res_tier, avail, depths):
    """(resident names, depth, None) of the preferred layout that fits, else (None, 0, cheapest).

    Preference: the deepest prefetch, then the most embed/head blocks resident, then the
    most layers resident, spread evenly among the streamed ones (``_spread_resident``). ``cheapest`` = (device bytes, slots, slot bytes).
    """
    fixed_res = [b for b in blocks if forced.get(b.name) == res_tier]
    fixed_str = [b.nbytes for b in blocks if forced.get(b.name, res_tier) != res_tier]
    others = [b for b in blocks if b.name not in forced and b.kind != "layer"]
    layers = [b for b in blocks if b.name not in forced and b.kind == "layer"]
    sizes, base = [b.nbytes for b in layers], sum(b.nbytes for b in fixed_res)
    subsets = [s for k in range(len(others), -1, -1) for s in itertools.combinations(others, k)]
    cheapest = None
    for depth in depths:
        for subset in subsets:
            streamed = fixed_str + [b.nbytes for b in others if b not in subset]
            costs = _prefix_costs(base + sum(b.nbytes for b in subset), streamed, sizes, depth)
            fits = [r for r, c in enumerate(costs) if c <= avail]
            if fits:
                chosen = _spread_resident(layers, max(fits), avail - (base + sum(b.nbytes for b in subset)),
                                          streamed, depth)
                return {b.name for b in fixed_res + list(subset) + chosen}, depth, None
            r = costs.index(min(costs))
            if cheapest is None or costs[r] < cheapest[0]:
                tail = streamed + sizes[r:]
                cheapest = (costs[r], _nslots(tail, depth), max(tail, default=0))
    return None, 0, cheapest


def _spread_resident(layers: list, r: int, room: int, streamed: list[int], depth: int) -> list:
    """``r`` resident layers spread evenly among the streamed ones (when the ring still fits).

    With the resident layers first, the copy engine idles while they compute (only
    ``depth`` blocks can be fetched ahead), and a step costs resident compute + transfer.
    Spread out, every resident layer's compute hides behind the copy of the next streamed
    block, so a step costs max(transfer, compute).
    """
    if r in (0, len(layers)):
        return layers[:r]
    keep = {id(b) for b in spread(layers, r)}
    res = [b for b in layers if id(b) in keep]
    rest = streamed + [b.nbytes for b in layers if id(b) not in keep]
    cost = sum(b.nbytes for b in res) + min(depth + 1, len(rest)) * max(rest)
    return res if cost <= room else layers[:r]


def _too_small(device: str, budget: int, kv: int, act: int, cheapest: tuple, how: str) -> PlanError:
    weights, nslots, slot = cheapest
    x = kv + act + weights     # the smallest budget B with B - overhead(B) >= x:
    needed = x + CPU_OVERHEAD if device == "cpu" else \
        max(x + CUDA_MIN_OVERHEAD, -(-x * CUDA_OVERHEAD_DIVISOR // (CUDA_OVERHEAD_DIVISOR - 1)))
    what = "GPU memory budget" if device == "cuda" else "RAM budget (device cpu)"
    parts = [f"resident blocks {fmt_bytes(weights - nslots * slot)}"]
    parts += [f"{nslots} stream slot{'s' * (nslots > 1)} x {fmt_bytes(slot)}"] if nslots else []
    parts += [f"KV cache {fmt_bytes(kv)}", f"activations {fmt_bytes(act)}", f"overhead {fmt_bytes(needed - x)}"]
    return PlanError(f"the {what} of {fmt_bytes(budget)} is too small {how}: at least "
                     f"{fmt_bytes(needed)} is needed ({', '.join(parts)})", needed, budget)


def _offload_tiers(blocks, forced, resident, device, budgets, depth, host=()) -> tuple[str, ...]:
    """Home tier of every block: resident, else pinned RAM up to its budget (cuda), then disk.
    ``host``: blocks computed on the host (pinned RAM, never streamed)."""
    tiers = [("gpu" if device == "cuda" else "cpu") if b.name in resident else forced.get(b.name) for b in blocks]
    if device == "cpu":
        tiers = [t or "disk" for t in tiers]
    else:
        streamed = [b.nbytes for b in blocks if b.name not in resident and b.name not in host]
        _fill_host(blocks, tiers, budgets.cpu, _nslots(streamed, depth) * max(streamed, default=0))
    disk = sum(b.nbytes for b, t in zip(blocks, tiers) if t == "disk")
    if budgets.disk is not None and disk > budgets.disk:
        raise PlanError(f"the disk budget of {fmt_bytes(budgets.disk)} is too small: {fmt_bytes(disk)} "
                        "of blocks must live on disk", disk, budgets.disk, "disk")
    return tuple(tiers)


def _fill_host(blocks, tiers: list, budget: int, staging: int) -> None:
    """Give unplaced streamed blocks (tier None) pinned RAM, first fit in order, else disk.

    When anything lives on disk, ``staging`` bytes of pinned RAM are kept for its reads.
    """
    host = sum(b.nbytes for b, t in zip(blocks, tiers) if t == "cpu")
    wanted = host + sum(b.nbytes for b, t in zip(blocks, tiers) if t is None)
    cap = budget - staging if "disk" in tiers or wanted > budget else budget
    if host > cap or cap < 0:
        needed = host + budget - cap
        raise PlanError(f"the pinned host RAM budget of {fmt_bytes(budget)} is too small: at least "
                        f"{fmt_bytes(needed)} is needed ({fmt_bytes(host)} of blocks on 'cpu', "
                        f"{fmt_bytes(budget - cap)} of staging for disk reads)", needed, budget, "cpu")
    for i, b in enumerate(blocks):
        if tiers[i] is None:
            tiers[i] = "cpu" if host + b.nbytes <= cap else "disk"
            host += b.nbytes if tiers[i] == "cpu" else 0
