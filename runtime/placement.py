"""The planner's data: BlockSpec, Budgets, Workload, PlanError and the frozen Placement. PURE.

A Placement is what ``runtime.planner.plan`` returns: every block's home tier ("gpu" / "cpu"
/ "disk"), the ring of slots streamed blocks pass through, the device reserves, the blocks
computed on the host CPU per phase (hybrid execution, cuda only), and the predicted times
(runtime/cost_model.py). The planned device bytes never exceed ``budgets.device``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

from runtime.cost_model import Bandwidths, PhaseCost, best_cpu, bound, phase_cost

__all__ = ["BlockSpec", "Bandwidths", "Budgets", "Workload", "Placement", "PlanError"]

KINDS = ("embed", "layer", "head")


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
    cpu_extra: int = 0             # pinned host bytes added when computed on the CPU (kernel copy)
    cpu_small: int = 0             # device bytes it keeps then (norms: its non-linear params)
    cpu_ok: bool = True            # may be computed on the CPU (its big tensors are linears)

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"block {self.name!r}: kind={self.kind!r} is not one of {KINDS}")
        for k in ("nbytes", "cpu_extra", "cpu_small"):
            _check(_is_count(getattr(self, k)), f"block {self.name!r}: {k}={getattr(self, k)!r} must be an int >= 0")
        _check(self.flops_per_token >= 0, f"block {self.name!r}: flops_per_token must be >= 0")


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

    ``cpu_compute`` / ``cpu_compute_prefill``: pinned-RAM layer blocks computed on the host
    CPU in a decode step / a prefill instead of streamed (cuda only; see runtime/cost_model.py).
    Fields after them are derived. ``staging_bytes``: pinned host buffers for disk reads (cuda
    with disk blocks: slots x slot_bytes). Times: ``transfer_s`` / ``compute_s`` / ``cpu_s`` /
    ``decode_s`` per decode step of the whole batch, ``prefill_*`` per prefill of batch x prompt
    tokens, for the chosen CPU sets; ``host_compute``: pinned-RAM blocks (the token embedding)
    computed on the host in every phase, never streamed (no ring slot); ``decode_stream_s`` / ``prefill_stream_s``: the same
    phases streaming every offloaded block (the alternative, shown by ``exa plan``).
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
    cpu_compute: frozenset = frozenset()          # decode: block names computed on the CPU
    cpu_compute_prefill: frozenset = frozenset()  # prefill: block names computed on the CPU
    host_compute: frozenset = frozenset()         # every phase: looked up on the host (embed)
    slots: int = field(init=False)
    slot_bytes: int = field(init=False)
    staging_bytes: int = field(init=False)
    transfer_s: float = field(init=False)
    compute_s: float = field(init=False)
    cpu_s: float = field(init=False)
    decode_s: float = field(init=False)
    prefill_transfer_s: float = field(init=False)
    prefill_compute_s: float = field(init=False)
    prefill_cpu_s: float = field(init=False)
    prefill_s: float = field(init=False)
    decode_stream_s: float = field(init=False)
    prefill_stream_s: float = field(init=False)
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self.device in ("cuda", "cpu"), f"device={self.device!r} must be 'cuda' or 'cpu'")
        _check(len(self.tiers) == len(self.blocks), f"{len(self.tiers)} tiers for {len(self.blocks)} blocks")
        bad = [(b.name, t) for b, t in zip(self.blocks, self.tiers) if t not in _allowed_tiers(self.device)]
        _check(not bad, f"invalid tiers on {self.device}: {bad[:3]}")
        streamed = [b.nbytes for b, t in zip(self.blocks, self.tiers)
                    if t != self.compute_tier and b.name not in self.host_compute]
        _check(not streamed or self.prefetch_depth >= 1, "prefetch_depth must be >= 1 when blocks are streamed")
        put = object.__setattr__
        put(self, "_index", {b.name: i for i, b in enumerate(self.blocks)})
        for key in ("cpu_compute", "cpu_compute_prefill", "host_compute"):
            names = frozenset(getattr(self, key))
            put(self, key, names)
            bad = sorted(n for n in names if self._index.get(n) is None or self.tiers[self._index[n]] != "cpu"
                         or self.device != "cuda")
            _check(not bad, f"{key}: {bad[:3]} are not pinned-RAM blocks on cuda")
        put(self, "slots", _nslots(streamed, self.prefetch_depth))
        put(self, "slot_bytes", max(streamed, default=0))
        disk = self.device == "cuda" and "disk" in self.tiers
        put(self, "staging_bytes", self.slots * self.slot_bytes if disk else 0)
        for prefix, tokens, on_cpu in (("", self.workload.batch, self.cpu_compute),
                                       ("prefill_", self.workload.batch * self.workload.prompt,
                                        self.cpu_compute_prefill)):
            cost = self.phase_cost(tokens, on_cpu)
            put(self, prefix + "transfer_s", cost.transfer_s)
            put(self, prefix + "compute_s", cost.compute_s)
            put(self, prefix + "cpu_s", cost.cpu_s)
            put(self, "decode_s" if not prefix else "prefill_s", cost.total_s)
            put(self, ("decode" if not prefix else "prefill") + "_stream_s", self.phase_cost(tokens).total_s)

    def phase_cost(self, tokens: int, on_cpu: frozenset = frozenset()) -> PhaseCost:
        """Predicted cost of a phase of ``tokens`` tokens with ``on_cpu`` computed on the CPU."""
        return phase_cost(self.blocks, self.tiers, self.device, self.bandwidths, tokens,
                          frozenset(on_cpu) | self.host_compute)

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
        """Names of the streamed blocks, in execution order (not those computed on the host)."""
        return [b.name for b, t in zip(self.blocks, self.tiers)
                if t != self.compute_tier and b.name not in self.host_compute]

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

    def cpu_candidates(self) -> list[BlockSpec]:
        """Blocks that may be computed on the CPU: pinned-RAM layer blocks (cuda) with ``cpu_ok``."""
        return [b for b, t in zip(self.blocks, self.tiers)
                if self.device == "cuda" and t == "cpu" and b.kind == "layer" and b.cpu_ok]

    def cpu_rooms(self) -> tuple[int, int]:
        """(pinned host bytes, device bytes) left for CPU-computed blocks when streaming only."""
        on_cpu = self.cpu_blocks()
        host = self.budgets.cpu - self.host_bytes + sum(b.cpu_extra for b in on_cpu)
        return host, self.budgets.device - self.device_bytes + sum(b.cpu_small for b in on_cpu)

    def hybrid_alternative(self, phase: str = "decode") -> tuple[frozenset, float]:
        """The cost model's best set of blocks to compute on the CPU in ``phase`` ("decode" |
        "prefill") and its predicted time; ``(frozenset(), inf)`` when none applies (no CPU
        rates, no candidates). Shown by ``exa plan`` whichever set was chosen."""
        return self._alternatives[phase]

    @functools.cached_property
    def _alternatives(self) -> dict:
        wl = self.workload
        return {phase: best_cpu(self.blocks, self.tiers, self.device, self.bandwidths, tokens,
                                self.cpu_candidates(), *self.cpu_rooms(), self.host_compute)
                for phase, tokens in (("decode", wl.batch), ("prefill", wl.batch * wl.prompt))}

    def cpu_blocks(self) -> list[BlockSpec]:
        """Blocks computed on the CPU in some phase (decode or prefill), in execution order."""
        names = self.cpu_compute | self.cpu_compute_prefill | self.host_compute
        return [b for b in self.blocks if b.name in names]

    @property
    def device_bytes(self) -> int:
        """Planned device use: resident + slots + KV cache + activations + overhead, plus the
        device copies of the CPU-computed blocks' small tensors (norms)."""
        small = sum(b.cpu_small for b in self.cpu_blocks())
        return self.resident_bytes + self.slots * self.slot_bytes + self.kv_budget + self.reserve + small

    @property
    def host_bytes(self) -> int:
        """Pinned host bytes: streamed blocks + disk staging + the CPU-kernel copies of the
        CPU-computed blocks (0 on device cpu)."""
        if self.device != "cuda":
            return 0
        return self.bytes_by_tier()["cpu"] + self.staging_bytes + sum(b.cpu_extra for b in self.cpu_blocks())

    @property
    def disk_bytes(self) -> int:
        """Bytes of the blocks whose home is the disk."""
        return self.bytes_by_tier()["disk"]

    @property
    def decode_tok_s(self) -> float:
        """Predicted decode tokens/s, whole batch (0 when unknown: CPU rates not measured)."""
        return self.workload.batch / self.decode_s

    @property
    def prefill_tok_s(self) -> float:
        """Predicted prefill tokens/s, whole batch."""
        return self.workload.batch * self.workload.prompt / self.prefill_s

    @property
    def decode_bound(self) -> str:
        """What limits a decode step: "host->GPU copy", "disk read", "host CPU", "memory
        bandwidth" or "compute"."""
        cost = PhaseCost(self.transfer_s, self.compute_s, self.cpu_s, self.decode_s)
        return bound(cost, self.blocks, self.tiers, self.device, self.bandwidths, self.workload.batch,
                     self.cpu_compute | self.host_compute)

    @property
    def prefill_bound(self) -> str:
        """What limits a prefill (same vocabulary as ``decode_bound``)."""
        cost = PhaseCost(self.prefill_transfer_s, self.prefill_compute_s, self.prefill_cpu_s, self.prefill_s)
        return bound(cost, self.blocks, self.tiers, self.device, self.bandwidths,
                     self.workload.batch * self.workload.prompt,
                     self.cpu_compute_prefill | self.host_compute)

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
