"""The placement planner: (block sizes, budgets, bandwidths, workload) -> a frozen Placement.

PURE: no torch, no I/O. Every block gets a home tier: resident on the compute device ("gpu"
on cuda, "cpu" on the CPU) or streamed from pinned host RAM ("cpu", cuda only) or "disk"
through a ring of ``slots`` device buffers of ``slot_bytes`` each. The planned device bytes
(resident + slots + KV cache + activations + overhead) never exceed ``budgets.device``: the
"no OOM at run time" promise. Predictions follow the cost model in docs/ARCHITECTURE.md: a
decode step reads every weight once and streamed bytes cross the link every step.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from runtime.units import MiB, fmt_bytes

__all__ = ["BlockSpec", "Bandwidths", "Budgets", "Workload", "Placement", "PlanError", "plan"]

KINDS = ("embed", "layer", "head")
LAUNCH_OVERHEAD_S = 20e-6            # per block per step: kernel launches, hooks, events
CUDA_MIN_OVERHEAD = 512 * MiB        # CUDA context, allocator fragmentation, workspaces ...
CUDA_OVERHEAD_DIVISOR = 20           # ... or 5% of the device budget, whichever is larger
CPU_OVERHEAD = 64 * MiB
DEFAULT_PREFETCH_DEPTH = 2
MODES = ("auto", "none", "cpu", "disk")


class PlanError(ValueError):
    """The budgets cannot hold the model as asked.

    ``needed`` / ``budget`` are bytes; ``resource`` names the short budget: "device" | "cpu" | "disk".
    """

    def __init__(self, message: str, needed: int, budget: int, resource: str = "device"):
        super().__init__(message)
        self.needed, self.budget, self.resource = needed, budget, resource


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class BlockSpec:
    """One movable piece of the model, in execution order."""

    name: str                      # "embed", "layers.0", ..., "layers.N-1", "head"
    nbytes: int                    # packed bytes of the block
    kind: str                      # "embed" | "layer" | "head"
    flops_per_token: float = 0.0   # ~2 * parameter count of the block

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"block {self.name!r}: kind={self.kind!r} is not one of {KINDS}")
        _check(_is_count(self.nbytes), f"block {self.name!r}: nbytes={self.nbytes!r} must be an int >= 0")
        _check(self.flops_per_token >= 0, f"block {self.name!r}: flops_per_token must be >= 0")


@dataclass(frozen=True)
class Bandwidths:
    """Measured rates in bytes/s (flop/s for ``device_flops``); see runtime/hardware.py."""

    h2d: float           # pinned host->GPU copy (0 when there is no GPU)
    disk: float          # disk sequential read
    device_mem: float    # memory bandwidth of the compute device (HBM, or RAM on cpu)
    device_flops: float  # dense matmul throughput of the compute device

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            _check(v >= 0, f"bandwidths.{k}={v!r} must be >= 0")


@dataclass(frozen=True)
class Budgets:
    """Bytes each tier may use for this model."""

    device: int              # compute device: VRAM for cuda, RAM for cpu
    cpu: int                 # pinned host RAM for streamed blocks; ignored when device == "cpu"
    disk: int | None = None  # None = unlimited

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            _check(_is_count(v) or (k == "disk" and v is None), f"budgets.{k}={v!r} must be an int >= 0")


@dataclass(frozen=True)
class Workload:
    """What will run: sizes the KV cache and activation reserve, and the predictions."""

    batch: int = 1
    context: int = 2048            # max tokens held in the KV cache per sequence
    prompt: int = 512              # prefill length used for the prediction
    kv_bytes_per_token: int = 0    # KV bytes per token per sequence, all layers together
    act_bytes_per_token: int = 0   # activation bytes per token in flight

    def __post_init__(self) -> None:
        for k, v in vars(self).items():
            low = 0 if k.endswith("per_token") else 1
            _check(_is_count(v) and v >= low, f"workload.{k}={v!r} must be an int >= {low}")


@dataclass(frozen=True)
class Placement:
    """Where every block lives, how it is streamed, and what that should cost.

    Fields after ``workload`` are derived. ``staging_bytes``: pinned host buffers for disk
    reads (cuda with disk blocks: slots x slot_bytes). Times: ``transfer_s`` / ``compute_s``
    / ``decode_s`` per decode step of the whole batch; ``prefill_compute_s`` / ``prefill_s``
    per prefill of batch x prompt tokens.
    """

    device: str                       # "cuda" | "cpu"
    blocks: tuple[BlockSpec, ...]
    tiers: tuple[str, ...]            # per block: "gpu" | "cpu" | "disk"
    prefetch_depth: int               # blocks loaded ahead of the one computing (0: none streamed)
    kv_budget: int                    # device bytes for the KV cache
    activations: int                  # device bytes for activations (the prefill peak)
    overhead: int                     # device bytes for context / allocator / workspaces
    budgets: Budgets
    bandwidths: Bandwidths
    workload: Workload
    slots: int = field(init=False)
    slot_bytes: int = field(init=False)
    staging_bytes: int = field(init=False)
    transfer_s: float = field(init=False)
    compute_s: float = field(init=False)
    prefill_compute_s: float = field(init=False)
    decode_s: float = field(init=False)
    prefill_s: float = field(init=False)
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self.device in ("cuda", "cpu"), f"device={self.device!r} must be 'cuda' or 'cpu'")
        _check(len(self.tiers) == len(self.blocks), f"{len(self.tiers)} tiers for {len(self.blocks)} blocks")
        bad = [(b.name, t) for b, t in zip(self.blocks, self.tiers) if t not in _allowed_tiers(self.device)]
        _check(not bad, f"invalid tiers on {self.device}: {bad[:3]}")
        streamed = [b.nbytes for b, t in zip(self.blocks, self.tiers) if t != self.compute_tier]
        _check(not streamed or self.prefetch_depth >= 1, "prefetch_depth must be >= 1 when blocks are streamed")
        put = object.__setattr__
        put(self, "_index", {b.name: i for i, b in enumerate(self.blocks)})
        put(self, "slots", _nslots(streamed, self.prefetch_depth))
        put(self, "slot_bytes", max(streamed, default=0))
        disk = self.device == "cuda" and "disk" in self.tiers
        put(self, "staging_bytes", self.slots * self.slot_bytes if disk else 0)
        for key, value in _predict(self).items():
            put(self, key, value)

    @property
    def compute_tier(self) -> str:
        """The tier the compute device reads directly: "gpu" on cuda, "cpu" on cpu."""
        return "gpu" if self.device == "cuda" else "cpu"

    @property
    def reserve(self) -> int:
        """Device bytes held back for activations and fixed overhead (KV cache not included)."""
        return self.activations + self.overhead

    def tier_of(self, name: str) -> str:
        """Home tier of block ``name`` (KeyError for an unknown name)."""
        if name not in self._index:
            raise KeyError(f"no block named {name!r} in this placement")
        return self.tiers[self._index[name]]

    def is_resident(self, name: str) -> bool:
        """True when block ``name`` lives on the compute device (never streamed)."""
        return self.tier_of(name) == self.compute_tier

    def streamed(self) -> list[str]:
        """Names of the streamed blocks, in execution order."""
        return [b.name for b, t in zip(self.blocks, self.tiers) if t != self.compute_tier]

    def bytes_by_tier(self) -> dict[str, int]:
        """Block bytes per home tier: {"gpu": ..., "cpu": ..., "disk": ...}."""
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for b, t in zip(self.blocks, self.tiers):
            out[t] += b.nbytes
        return out

    @property
    def resident_bytes(self) -> int:
        """Bytes of the blocks resident on the compute device."""
        return self.bytes_by_tier()[self.compute_tier]

    @property
    def device_bytes(self) -> int:
        """Planned device use: resident + slots + KV cache + activations + overhead."""
        return self.resident_bytes + self.slots * self.slot_bytes + self.kv_budget + self.reserve

    @property
    def host_bytes(self) -> int:
        """Pinned host bytes: streamed blocks + disk staging (0 on device cpu)."""
        return self.bytes_by_tier()["cpu"] + self.staging_bytes if self.device == "cuda" else 0

    @property
    def disk_bytes(self) -> int:
        """Bytes of the blocks whose home is the disk."""
        return self.bytes_by_tier()["disk"]

    @property
    def decode_tok_s(self) -> float:
        """Predicted decode tokens/s, whole batch."""
        return self.workload.batch / self.decode_s

    @property
    def prefill_tok_s(self) -> float:
        """Predicted prefill tokens/s, whole batch."""
        return self.workload.batch * self.workload.prompt / self.prefill_s

    @property
    def decode_bound(self) -> str:
        """What limits a decode step: "host->GPU copy", "disk read", "memory bandwidth" or "compute"."""
        return _bound(self, self.compute_s, self.workload.batch)

    @property
    def prefill_bound(self) -> str:
        """What limits a prefill (same vocabulary as ``decode_bound``)."""
        return _bound(self, self.prefill_compute_s, self.workload.batch * self.workload.prompt)

    def table(self) -> str:
        """A readable placement table: blocks per tier, memory use, predicted speed."""
        from runtime.plan_table import render
        return render(self)

    def __str__(self) -> str:
        return self.table()


def _allowed_tiers(device: str) -> tuple[str, ...]:
    return ("gpu", "cpu", "disk") if device == "cuda" else ("cpu", "disk")


def _nslots(streamed: Sequence[int], depth: int) -> int:
    return min(depth + 1, len(streamed))


# -- cost model --------------------------------------------------------------------------
def _div(amount: float, rate: float, what: str) -> float:
    if amount == 0:
        return 0.0
    _check(rate > 0, f"bandwidths.{what} is 0 but this placement needs it")
    return amount / rate


def _link_times(p: Placement) -> tuple[float, float]:
    """(host->GPU seconds, disk seconds) for one pass over the streamed blocks."""
    by = p.bytes_by_tier()
    h2d = _div(by["cpu"] + by["disk"], p.bandwidths.h2d, "h2d") if p.device == "cuda" else 0.0
    return h2d, _div(by["disk"], p.bandwidths.disk, "disk")


def _mem_s(p: Placement) -> float:
    # An embedding lookup reads only the rows it needs, not the whole table.
    return _div(sum(b.nbytes for b in p.blocks if b.kind != "embed"), p.bandwidths.device_mem, "device_mem")


def _flops_s(p: Placement, tokens: int) -> float:
    return _div(tokens * sum(b.flops_per_token for b in p.blocks), p.bandwidths.device_flops, "device_flops")


def _predict(p: Placement) -> dict[str, float]:
    wl, launch = p.workload, LAUNCH_OVERHEAD_S * len(p.blocks)
    transfer = max(_link_times(p))
    compute = max(_mem_s(p), _flops_s(p, wl.batch))
    prefill = max(_mem_s(p), _flops_s(p, wl.batch * wl.prompt))
    return {"transfer_s": transfer, "compute_s": compute, "prefill_compute_s": prefill,
            "decode_s": max(transfer, compute) + launch, "prefill_s": max(transfer, prefill) + launch}


def _bound(p: Placement, compute: float, tokens: int) -> str:
    if p.transfer_s > compute:
        h2d, disk = _link_times(p)
        return "disk read" if disk >= h2d else "host->GPU copy"
    return "memory bandwidth" if _mem_s(p) >= _flops_s(p, tokens) else "compute"


# -- planning ----------------------------------------------------------------------------
def plan(blocks: Sequence[BlockSpec], budgets: Budgets, bandwidths: Bandwidths,
         workload: Workload = Workload(), device: str = "cuda",
         mode: str | Mapping[str, str] = "auto", prefetch_depth: int | None = None) -> Placement:
    """Place every block on a tier so that the device budget is never exceeded.

    Args:
        blocks: the model's blocks in execution order (unique names).
        budgets: bytes allowed on the device, in pinned host RAM and on disk.
        bandwidths: rates for the predictions; ``h2d`` must be > 0 on cuda when anything is
            streamed, ``disk`` > 0 when anything lives on disk.
        workload: batch / context / prompt sizes; sizes the KV cache and activations.
        device: "cuda" (or "cuda:N") or "cpu".
        mode: "auto" (embed/head resident, then as many layers as fit, from the first; the
            rest streamed from pinned RAM up to its budget, then disk), "none" (everything
            resident), "cpu" / "disk" (every layer streamed from that tier), or a dict of
            block name or fnmatch pattern ("layers.*") -> tier. An exact name wins over a
            pattern, a later pattern over an earlier one; unnamed blocks are placed as "auto".
        prefetch_depth: blocks loaded ahead of the one computing; default 2, or 1 when only
            two slots fit. 0 in the result when nothing is streamed.

    Returns:
        A frozen :class:`Placement`.

    Raises:
        PlanError: the budgets cannot hold the model this way; the message says how much is
            needed. ValueError: a bad mode, tier, pattern, device or depth.
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
    resident, depth, cheapest = _choose_resident(blocks, forced, res_tier, avail, depths)
    if resident is None:
        how = "to hold every block resident" if mode == "none" else f"with offload={mode!r}" + \
            (f" and prefetch_depth={prefetch_depth}" if prefetch_depth is not None else "")
        raise _too_small(device, budgets.device, kv, act, cheapest, how)
    depth = depth if len(resident) < len(blocks) else 0
    tiers = _offload_tiers(blocks, forced, resident, device, budgets, depth)
    return Placement(device, blocks, tiers, depth, kv, act, overhead, budgets, bandwidths, workload)


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

    Preference: the deepest prefetch, then the most embed/head blocks resident, then the most
    layers resident from the first one. ``cheapest`` = (device bytes, slots, slot bytes).
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
                return {b.name for b in fixed_res + list(subset) + layers[: max(fits)]}, depth, None
            r = costs.index(min(costs))
            if cheapest is None or costs[r] < cheapest[0]:
                tail = streamed + sizes[r:]
                cheapest = (costs[r], _nslots(tail, depth), max(tail, default=0))
    return None, 0, cheapest


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


def _offload_tiers(blocks, forced, resident, device, budgets, depth) -> tuple[str, ...]:
    """Home tier of every block: resident, else pinned RAM up to its budget (cuda), then disk."""
    tiers = [("gpu" if device == "cuda" else "cpu") if b.name in resident else forced.get(b.name) for b in blocks]
    if device == "cpu":
        tiers = [t or "disk" for t in tiers]
    else:
        streamed = [b.nbytes for b in blocks if b.name not in resident]
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
