"""The placement planner: (block sizes, budgets, bandwidths, workload) -> a frozen Placement.

PURE: no torch, no I/O. Every block gets a home tier: resident on the compute device
("gpu" when the device is cuda, "cpu" when it is the CPU) or streamed from pinned host RAM
("cpu", cuda only) or "disk" through a ring of ``slots`` buffers of ``slot_bytes`` each on
the device. The planned device bytes (resident + slots + KV cache + activations + overhead)
never exceed ``budgets.device``: that is the "no OOM at run time" promise.

Predicted times follow the cost model of docs/ARCHITECTURE.md: a decode step reads every
weight byte once, and streamed bytes cross the host->device link (and the disk) every step.
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
CUDA_MIN_OVERHEAD = 512 * MiB        # CUDA context, allocator fragmentation, workspaces
CUDA_OVERHEAD_DIVISOR = 20           # ... or 5% of the device budget, whichever is larger
CPU_OVERHEAD = 64 * MiB
DEFAULT_PREFETCH_DEPTH = 2
_MODES = ("auto", "none", "cpu", "disk")


class PlanError(ValueError):
    """The budgets cannot hold the model as asked.

    ``needed`` / ``budget`` are bytes; ``resource`` names the budget that is short.
    """

    def __init__(self, message: str, needed: int | None = None, budget: int | None = None,
                 resource: str = "device"):
        super().__init__(message)
        self.needed = needed
        self.budget = budget
        self.resource = resource    # which budget is short: "device" | "cpu" | "disk"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_count(v: object, allow_none: bool = False) -> bool:
    return (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


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
    device_mem: float    # memory bandwidth of the compute device
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
            _check(_is_count(v, allow_none=k == "disk"), f"budgets.{k}={v!r} must be an int >= 0 (bytes)")


@dataclass(frozen=True)
class Workload:
    """What will run: sizes the KV cache and activation reserve and the predictions."""

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

    ``slots``, ``slot_bytes`` and the predicted times are derived from the other fields.
    Times: ``transfer_s`` / ``compute_s`` / ``decode_s`` are per decode step of the whole
    batch; ``prefill_compute_s`` / ``prefill_s`` are for one prefill of batch x prompt tokens.
    """

    device: str                       # "cuda" | "cpu"
    blocks: tuple[BlockSpec, ...]
    tiers: tuple[str, ...]            # per block: "gpu" | "cpu" | "disk"
    prefetch_depth: int               # blocks loaded ahead of the one computing (0: none streamed)
    kv_budget: int                    # device bytes for the KV cache
    activations: int                  # device bytes for activations (prefill peak)
    overhead: int                     # device bytes for context / allocator / workspaces
    budgets: Budgets
    bandwidths: Bandwidths
    workload: Workload
    staging_bytes: int = 0            # pinned host staging for disk reads (cuda only)
    slots: int = field(init=False)
    slot_bytes: int = field(init=False)
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
        put(self, "slots", min(self.prefetch_depth + 1, len(streamed)) if streamed else 0)
        put(self, "slot_bytes", max(streamed, default=0))
        for key, value in _predict(self).items():
            put(self, key, value)

    # -- queries -----------------------------------------------------------------------
    @property
    def compute_tier(self) -> str:
        """The tier the compute device reads directly: "gpu" on cuda, "cpu" on cpu."""
        return "gpu" if self.device == "cuda" else "cpu"

    @property
    def reserve(self) -> int:
        """Device bytes held back for activations and fixed overhead (KV cache not included)."""
        return self.activations + self.overhead

    def tier_of(self, name: str) -> str:
        """Home tier of block ``name``."""
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
        """Planned device usage: resident + slots + KV cache + activations + overhead."""
        return self.resident_bytes + self.slots * self.slot_bytes + self.kv_budget + self.reserve

    @property
    def host_bytes(self) -> int:
        """Pinned host bytes for streamed blocks and disk staging (0 on device cpu)."""
        return self.bytes_by_tier()["cpu"] + self.staging_bytes if self.device == "cuda" else 0

    @property
    def disk_bytes(self) -> int:
        """Bytes of the blocks whose home is the disk."""
        return self.bytes_by_tier()["disk"]

    @property
    def decode_tok_s(self) -> float:
        """Predicted decode tokens/s over the whole batch."""
        return self.workload.batch / self.decode_s

    @property
    def prefill_tok_s(self) -> float:
        """Predicted prefill tokens/s over the whole batch."""
        return self.workload.batch * self.workload.prompt / self.prefill_s

    @property
    def decode_bound(self) -> str:
        """What limits a decode step: a transfer link, memory bandwidth or compute."""
        return _bound(self, self.transfer_s, self.compute_s, self.workload.batch)

    @property
    def prefill_bound(self) -> str:
        """What limits a prefill."""
        wl = self.workload
        return _bound(self, self.transfer_s, self.prefill_compute_s, wl.batch * wl.prompt)

    def table(self) -> str:
        """A readable placement table: blocks per tier, memory use, predicted speed."""
        return _render(self)

    def __str__(self) -> str:
        return self.table()


def _allowed_tiers(device: str) -> tuple[str, ...]:
    return ("gpu", "cpu", "disk") if device == "cuda" else ("cpu", "disk")


# -- cost model --------------------------------------------------------------------------
def _div(amount: float, rate: float, what: str) -> float:
    if amount == 0:
        return 0.0
    if rate <= 0:
        raise ValueError(f"bandwidths.{what} is 0 but the placement needs it ({fmt_bytes(amount)} per step)"
                         if what in ("h2d", "disk") else f"bandwidths.{what} must be > 0")
    return amount / rate


def _link_times(p: Placement) -> tuple[float, float]:
    """(host->device seconds, disk seconds) per pass over the streamed blocks."""
    by = p.bytes_by_tier()
    disk = _div(by["disk"], p.bandwidths.disk, "disk")
    if p.device == "cpu":
        return 0.0, disk
    return _div(by["cpu"] + by["disk"], p.bandwidths.h2d, "h2d"), disk


def _mem_s(p: Placement) -> float:
    # An embedding lookup reads only the rows it needs, not the whole table.
    read = sum(b.nbytes for b in p.blocks if b.kind != "embed")
    return _div(read, p.bandwidths.device_mem, "device_mem")


def _flops_s(p: Placement, tokens: int) -> float:
    flops = tokens * sum(b.flops_per_token for b in p.blocks)
    return _div(flops, p.bandwidths.device_flops, "device_flops")


def _predict(p: Placement) -> dict[str, float]:
    wl = p.workload
    transfer = max(_link_times(p))
    compute = max(_mem_s(p), _flops_s(p, wl.batch))
    prefill_compute = max(_mem_s(p), _flops_s(p, wl.batch * wl.prompt))
    launch = LAUNCH_OVERHEAD_S * len(p.blocks)
    return {"transfer_s": transfer, "compute_s": compute, "prefill_compute_s": prefill_compute,
            "decode_s": max(transfer, compute) + launch,
            "prefill_s": max(transfer, prefill_compute) + launch}


def _bound(p: Placement, transfer: float, compute: float, tokens: int) -> str:
    if transfer > compute:
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
        bandwidths: measured rates used for the predictions (``h2d`` must be > 0 on cuda
            when anything is streamed, ``disk`` > 0 when anything lives on disk).
        workload: batch / context / prompt sizes; sizes the KV cache and activations.
        device: "cuda" (or "cuda:N") or "cpu".
        mode: "auto" (embed/head resident, then as many layers as fit, in order; the rest
            streamed from pinned RAM, then disk), "none" (everything resident), "cpu" /
            "disk" (every layer streamed from that tier), or a dict mapping block names or
            fnmatch patterns ("layers.*") to a tier; an exact name wins over a pattern,
            a later pattern over an earlier one, unnamed blocks are placed as in "auto".
        prefetch_depth: blocks loaded ahead of the one computing; default 2 (1 when only
            two slots fit).

    Returns:
        A frozen :class:`Placement`.

    Raises:
        PlanError: the budgets cannot hold the model this way (the message says how much
            is needed). ValueError: a bad mode, tier, pattern or argument.
    """
    blocks = _check_blocks(blocks)
    device = _norm_device(device)
    depths = _depth_choices(prefetch_depth)
    forced = _forced_tiers(blocks, mode, device)
    res_tier = "gpu" if device == "cuda" else "cpu"
    kv = workload.batch * workload.context * workload.kv_bytes_per_token
    act = workload.batch * workload.prompt * workload.act_bytes_per_token
    overhead = _overhead(device, budgets.device)
    avail = budgets.device - kv - act - overhead
    resident, depth, cheapest = _choose_resident(blocks, forced, res_tier, avail, depths)
    if resident is None:
        how = "to hold every block resident" if mode == "none" else f"with offload={mode!r}" + \
            (f" and prefetch_depth={prefetch_depth}" if prefetch_depth is not None else "")
        raise _too_small(device, budgets.device, kv, act, cheapest, how)
    if len(resident) == len(blocks):
        depth = 0
    tiers = _offload_tiers(blocks, forced, resident, device, budgets, depth)
    staging = _staging(blocks, tiers, device, depth)
    return Placement(device, blocks, tiers, depth, kv, act, overhead, budgets, bandwidths,
                     workload, staging)


def _check_blocks(blocks: Sequence[BlockSpec]) -> tuple[BlockSpec, ...]:
    blocks = tuple(blocks)
    _check(bool(blocks), "blocks is empty: nothing to place")
    _check(all(isinstance(b, BlockSpec) for b in blocks), "blocks must be BlockSpec instances")
    names = [b.name for b in blocks]
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"block names appear twice: {dup}")
    return blocks


def _norm_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    if isinstance(device, str) and re.fullmatch(r"cuda(:\d+)?", device):
        return "cuda"
    raise ValueError(f"device={device!r} must be 'cuda', 'cuda:N' or 'cpu'")


def _depth_choices(prefetch_depth: int | None) -> tuple[int, ...]:
    if prefetch_depth is None:
        return (DEFAULT_PREFETCH_DEPTH, 1)
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise ValueError(f"prefetch_depth={prefetch_depth!r} must be an int >= 1")
    return (prefetch_depth,)


def _overhead(device: str, budget: int) -> int:
    if device == "cpu":
        return CPU_OVERHEAD
    return max(CUDA_MIN_OVERHEAD, budget // CUDA_OVERHEAD_DIVISOR)


def _forced_tiers(blocks: tuple[BlockSpec, ...], mode, device: str) -> dict[str, str]:
    """Tiers fixed by ``mode``; blocks absent from the result are placed automatically."""
    res_tier = "gpu" if device == "cuda" else "cpu"
    if isinstance(mode, Mapping):
        return _dict_tiers(blocks, mode, device)
    if mode not in _MODES:
        raise ValueError(f"offload mode {mode!r} is not one of {_MODES} or a dict of block -> tier")
    if mode == "none":
        return {b.name: res_tier for b in blocks}
    if mode in ("cpu", "disk"):
        return {b.name: mode for b in blocks if b.kind == "layer"}
    return {}


def _dict_tiers(blocks: tuple[BlockSpec, ...], mode: Mapping[str, str], device: str) -> dict[str, str]:
    allowed = _allowed_tiers(device)
    names = [b.name for b in blocks]
    exact, patterns = {}, {}
    for key, tier in mode.items():
        if tier not in allowed:
            raise ValueError(f"offload[{key!r}] = {tier!r}: tier must be one of {allowed} on {device}")
        if key in names:
            exact[key] = tier
        elif fnmatch.filter(names, key):
            patterns[key] = tier
        else:
            raise ValueError(f"offload key {key!r} matches no block (blocks: {names[0]} ... {names[-1]})")
    out: dict[str, str] = {}
    for pattern, tier in patterns.items():
        out.update({n: tier for n in fnmatch.filter(names, pattern)})
    out.update(exact)
    return out


def _slot_cost(sizes: Sequence[int], depth: int) -> int:
    return min(depth + 1, len(sizes)) * max(sizes) if sizes else 0


def _prefix_costs(fixed: int, streamed: list[int], layers: list[int], depth: int) -> list[int]:
    """Device bytes when layers[:r] are resident and layers[r:] + streamed are streamed, r = 0..n."""
    n = len(layers)
    costs, tail_max, tail = [0] * (n + 1), max(streamed, default=0), len(streamed)
    prefix = list(itertools.accumulate(layers, initial=0))
    for r in range(n, -1, -1):
        if r < n:
            tail_max, tail = max(tail_max, layers[r]), tail + 1
        costs[r] = fixed + prefix[r] + (min(depth + 1, tail) * tail_max if tail else 0)
    return costs


def _choose_resident(blocks, forced, res_tier, avail, depths):
    """(resident names, depth, None) of the preferred layout that fits, else (None, 0, cheapest).

    Preference: the deepest prefetch, then the most embed/head blocks resident, then the
    most layers resident from the first one. ``cheapest`` = (device bytes, slots, slot bytes).
    """
    fixed_res = [b for b in blocks if forced.get(b.name) == res_tier]
    fixed_str = [b.nbytes for b in blocks if forced.get(b.name, res_tier) != res_tier]
    others = [b for b in blocks if b.name not in forced and b.kind != "layer"]
    layers = [b for b in blocks if b.name not in forced and b.kind == "layer"]
    sizes = [b.nbytes for b in layers]
    base = sum(b.nbytes for b in fixed_res)
    subsets = [s for k in range(len(others), -1, -1) for s in itertools.combinations(others, k)]
    cheapest = None
    for depth in depths:
        for subset in subsets:
            streamed = fixed_str + [b.nbytes for b in others if b not in subset]
            costs = _prefix_costs(base + sum(b.nbytes for b in subset), streamed, sizes, depth)
            fits = [r for r, c in enumerate(costs) if c <= avail]
            if fits:
                chosen = fixed_res + list(subset) + layers[: max(fits)]
                return {b.name for b in chosen}, depth, None
            r = costs.index(min(costs))
            if cheapest is None or costs[r] < cheapest[0]:
                tail = streamed + sizes[r:]
                cheapest = (costs[r], min(depth + 1, len(tail)), max(tail, default=0))
    return None, 0, cheapest


def _needed_budget(device: str, x: int) -> int:
    """Smallest device budget B with B - overhead(B) >= x."""
    if device == "cpu":
        return x + CPU_OVERHEAD
    return max(x + CUDA_MIN_OVERHEAD, -(-x * CUDA_OVERHEAD_DIVISOR // (CUDA_OVERHEAD_DIVISOR - 1)))


def _too_small(device, budget, kv, act, cheapest, how) -> PlanError:
    weights, nslots, slot = cheapest
    needed = _needed_budget(device, kv + act + weights)
    what = "GPU memory budget" if device == "cuda" else "RAM budget (device cpu)"
    parts = [f"resident blocks {fmt_bytes(weights - nslots * slot)}"]
    parts += [f"{nslots} stream slot{'s' * (nslots > 1)} x {fmt_bytes(slot)}"] if nslots else []
    parts += [f"KV cache {fmt_bytes(kv)}", f"activations {fmt_bytes(act)}",
              f"overhead {fmt_bytes(needed - kv - act - weights)}"]
    return PlanError(f"the {what} of {fmt_bytes(budget)} is too small {how}: at least "
                     f"{fmt_bytes(needed)} is needed ({', '.join(parts)})", needed=needed, budget=budget)


def _offload_tiers(blocks, forced, resident, device, budgets, depth) -> tuple[str, ...]:
    """Home tier of every block: resident, else pinned RAM up to its budget (cuda), then disk."""
    res_tier = "gpu" if device == "cuda" else "cpu"
    tiers = [res_tier if b.name in resident else forced.get(b.name) for b in blocks]
    if device == "cpu":
        tiers = [t or "disk" for t in tiers]
    else:
        _fill_host(blocks, tiers, budgets.cpu, _slot_cost([b.nbytes for b, t in zip(blocks, tiers)
                                                           if t != "gpu"], depth))
    disk = sum(b.nbytes for b, t in zip(blocks, tiers) if t == "disk")
    if budgets.disk is not None and disk > budgets.disk:
        raise PlanError(f"the disk budget of {fmt_bytes(budgets.disk)} is too small: {fmt_bytes(disk)} "
                        "of blocks must live on disk", needed=disk, budget=budgets.disk, resource="disk")
    return tuple(tiers)


def _fill_host(blocks, tiers: list, budget: int, staging: int) -> None:
    """Put unplaced streamed blocks (tier None) in pinned RAM, first fit in order, else on disk.

    When anything lives on disk, ``staging`` bytes of pinned RAM are kept for the reads.
    """
    host = sum(b.nbytes for b, t in zip(blocks, tiers) if t == "cpu")
    wanted = host + sum(b.nbytes for b, t in zip(blocks, tiers) if t is None)
    cap = budget - staging if "disk" in tiers or wanted > budget else budget
    if host > cap or cap < 0:
        needed = host + budget - cap
        raise PlanError(f"the pinned host RAM budget of {fmt_bytes(budget)} is too small: at least "
                        f"{fmt_bytes(needed)} is needed ({fmt_bytes(host)} of blocks placed on 'cpu', "
                        f"{fmt_bytes(budget - cap)} of staging for disk reads)",
                        needed=needed, budget=budget, resource="cpu")
    for i, b in enumerate(blocks):
        if tiers[i] is None:
            tiers[i] = "cpu" if host + b.nbytes <= cap else "disk"
            host += b.nbytes if tiers[i] == "cpu" else 0


def _staging(blocks, tiers, device, depth) -> int:
    """Pinned staging buffers for disk -> host -> GPU: one per slot, each one slot wide."""
    if device != "cuda" or "disk" not in tiers:
        return 0
    return _slot_cost([b.nbytes for b, t in zip(blocks, tiers) if t != "gpu"], depth)


# -- the table ---------------------------------------------------------------------------
def _groups(p: Placement) -> list[tuple[str, str, list[int]]]:
    rows: list[tuple[list[str], str, str, list[int]]] = []
    for b, t in zip(p.blocks, p.tiers):
        if rows and rows[-1][1] == t and rows[-1][2] == b.kind:
            rows[-1][0].append(b.name)
            rows[-1][3].append(b.nbytes)
        else:
            rows.append(([b.name], t, b.kind, [b.nbytes]))
    return [(_range_label(names), t, sizes) for names, t, _, sizes in rows]


def _range_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    first, last = re.fullmatch(r"(.*?)(\d+)", names[0]), re.fullmatch(r"(.*?)(\d+)", names[-1])
    if first and last and first.group(1) == last.group(1):
        return f"{names[0]}-{last.group(2)}"
    return f"{names[0]}..{names[-1]}"


def _size_text(sizes: list[int]) -> str:
    if len(sizes) == 1:
        return fmt_bytes(sizes[0])
    if len(set(sizes)) == 1:
        return f"{len(sizes)} x {fmt_bytes(sizes[0])} = {fmt_bytes(sum(sizes))}"
    return f"{len(sizes)} blocks, {fmt_bytes(sum(sizes))}"


def _secs(s: float) -> str:
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def _render(p: Placement) -> str:
    wl, b = p.workload, p.budgets
    total = sum(x.nbytes for x in p.blocks)
    lines = [f"Placement on {p.device}: {len(p.blocks)} blocks, {fmt_bytes(total)}, "
             f"prefetch depth {p.prefetch_depth}",
             f"  {'block':<22}{'tier':<6}{'home':<10}size"]
    for label, tier, sizes in _groups(p):
        home = "resident" if tier == p.compute_tier else "streamed"
        lines.append(f"  {label:<22}{tier:<6}{home:<10}{_size_text(sizes)}")
    dev = "GPU" if p.device == "cuda" else "RAM"
    lines += [f"Device memory ({dev}):",
              f"  resident blocks   {fmt_bytes(p.resident_bytes)}",
              f"  stream slots      {p.slots} x {fmt_bytes(p.slot_bytes)} = {fmt_bytes(p.slots * p.slot_bytes)}",
              f"  KV cache          {fmt_bytes(p.kv_budget)} (batch {wl.batch} x {wl.context} tokens)",
              f"  activations       {fmt_bytes(p.activations)} (batch {wl.batch} x prompt {wl.prompt})",
              f"  overhead          {fmt_bytes(p.overhead)}",
              f"  total             {fmt_bytes(p.device_bytes)} of {fmt_bytes(b.device)} budget"]
    if p.device == "cuda":
        lines.append(f"Pinned host RAM: {fmt_bytes(p.bytes_by_tier()['cpu'])} blocks + "
                     f"{fmt_bytes(p.staging_bytes)} disk staging of {fmt_bytes(b.cpu)} budget")
    limit = "unlimited" if b.disk is None else fmt_bytes(b.disk)
    lines.append(f"Disk: {fmt_bytes(p.disk_bytes)} of {limit} budget")
    lines += [f"Predicted (batch {wl.batch}, prompt {wl.prompt}):",
              f"  decode   {_rate(p.decode_tok_s)} tok/s  ({_secs(p.decode_s)}/step: transfer "
              f"{_secs(p.transfer_s)}, compute {_secs(p.compute_s)}; bound by {p.decode_bound})",
              f"  prefill  {_rate(p.prefill_tok_s)} tok/s  ({_secs(p.prefill_s)}/prompt: transfer "
              f"{_secs(p.transfer_s)}, compute {_secs(p.prefill_compute_s)}; bound by {p.prefill_bound})"]
    return "\n".join(lines)
