"""The cluster planner: split a model's layers into contiguous pipeline stages over workers.

PURE: no torch, no Ray, no I/O. A *worker* is one GPU (or one CPU-only node) of the cluster,
described by its budgets and bandwidths (``NodeSpec``). Every candidate stage — a contiguous
range of decoder layers, plus the embedding on the first stage and the final norm + lm_head on
the last — is placed on its worker by ``runtime.planner.plan`` itself, so a stage's predicted
time per token follows exactly the single-machine cost model (resident vs streamed bytes,
memory bandwidth, flops), plus the hop that brings the hidden states in over the network.

The split minimises the slowest stage's decode time per step (what bounds a pipeline kept
full with micro-batches), then the sum of stage times (the latency of one token, which
crosses every stage in turn). Workers are used in the order given; a worker that cannot hold
any stage, or does not help, is left out (``ClusterPlan.unused``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from runtime import planner
from runtime.planner import Bandwidths, BlockSpec, Budgets, Placement, PlanError, Workload
from runtime.units import fmt_bytes

__all__ = ["NodeSpec", "StagePlan", "ClusterPlan", "plan_cluster", "stage_blocks"]

DEFAULT_NET_BW = 1.25e9          # bytes/s: 10 GbE
DEFAULT_NET_LATENCY_S = 2e-4     # one hop on a LAN, including serialisation


@dataclass(frozen=True)
class NodeSpec:
    """One worker of the cluster: a GPU, or a CPU-only node."""

    name: str                                  # e.g. "10.0.0.2/gpu0"
    device: str                                # "cuda" | "cpu"
    budgets: Budgets                           # what this worker may use (see runtime.planner)
    bandwidths: Bandwidths
    net_bw: float = DEFAULT_NET_BW             # bytes/s of the link the hidden states arrive on
    net_latency_s: float = DEFAULT_NET_LATENCY_S

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"worker {self.name!r}: device={self.device!r} must be 'cuda' or 'cpu'")
        if self.net_bw <= 0 or self.net_latency_s < 0:
            raise ValueError(f"worker {self.name!r}: net_bw must be > 0 and net_latency_s >= 0")


@dataclass(frozen=True)
class StagePlan:
    """Layers ``first .. end-1`` (plus embed / head when first / last) on one worker."""

    index: int
    node: NodeSpec
    first: int
    end: int
    placement: Placement              # the worker's own plan for this stage's blocks
    hop_decode_s: float               # hidden states in, per decode step (0 on the first stage)
    hop_prefill_s: float

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.placement.blocks)

    @property
    def decode_s(self) -> float:
        return self.placement.decode_s + self.hop_decode_s

    @property
    def prefill_s(self) -> float:
        return self.placement.prefill_s + self.hop_prefill_s

    def describe(self) -> str:
        """E.g. "embed, layers.0-15" (the blocks this stage owns)."""
        names = self.blocks
        layers = [n for n in names if n.startswith("layers.")]
        parts = [n for n in names if n == "embed"]
        if layers:
            parts.append(layers[0] if len(layers) == 1 else f"{layers[0]}-{self.end - 1}")
        parts += [n for n in names if n == "head"]
        return ", ".join(parts)


@dataclass(frozen=True)
class ClusterPlan:
    """Stages in pipeline order and what they should cost (frozen; ``table()`` explains it)."""

    stages: tuple[StagePlan, ...]
    workload: Workload
    num_layers: int
    unused: tuple[NodeSpec, ...] = ()
    decode_s: float = field(init=False)          # one step of the whole batch through all stages
    prefill_s: float = field(init=False)
    bottleneck_s: float = field(init=False)      # slowest stage's decode step

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "decode_s", sum(s.decode_s for s in self.stages))
        put(self, "prefill_s", sum(s.prefill_s for s in self.stages))
        put(self, "bottleneck_s", max(s.decode_s for s in self.stages))

    @property
    def decode_tok_s(self) -> float:
        """Predicted decode tokens/s of the batch when each step crosses the stages in turn."""
        return self.workload.batch / self.decode_s

    @property
    def pipelined_tok_s(self) -> float:
        """Predicted decode tokens/s with the pipeline kept full (micro-batches, many requests)."""
        return self.workload.batch / self.bottleneck_s

    @property
    def prefill_tok_s(self) -> float:
        return self.workload.batch * self.workload.prompt / self.prefill_s

    def table(self) -> str:
        """The split, one line per stage, and the predicted speeds."""
        wl = self.workload
        lines = [f"Cluster plan: {self.num_layers} layers in {len(self.stages)} stage"
                 f"{'s' * (len(self.stages) != 1)} (batch {wl.batch}, prompt {wl.prompt})",
                 f"  {'stage':<6}{'worker':<28}{'blocks':<24}{'resident':>10}{'streamed':>10}"
                 f"{'decode/step':>13}"]
        for s in self.stages:
            p = s.placement
            lines.append(f"  {s.index:<6}{s.node.name[:27]:<28}{s.describe()[:23]:<24}"
                         f"{fmt_bytes(p.resident_bytes):>10}{fmt_bytes(_streamed(p)):>10}"
                         f"{_ms(s.decode_s):>13}")
        lines += [f"  unused worker: {n.name} (no stage helps there or fits)" for n in self.unused]
        slow = max(self.stages, key=lambda s: s.decode_s)
        lines += [f"Predicted (batch {wl.batch}):",
                  f"  decode   {_rate(self.decode_tok_s)} tok/s (a step crosses every stage in turn: "
                  f"{_ms(self.decode_s)})",
                  f"  pipelined decode {_rate(self.pipelined_tok_s)} tok/s with the pipeline full "
                  f"(bottleneck: stage {slow.index}, {_ms(slow.decode_s)})",
                  f"  prefill  {_rate(self.prefill_tok_s)} tok/s ({_ms(self.prefill_s)} per prompt)"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _streamed(p: Placement) -> int:
    return sum(b.nbytes for b in p.blocks if not p.is_resident(b.name))


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}"


def stage_blocks(blocks: Sequence[BlockSpec], first: int, end: int) -> tuple[BlockSpec, ...]:
    """The blocks of the stage holding layers ``first .. end-1`` (embed/head at the ends)."""
    layers = [b for b in blocks if b.kind == "layer"]
    out = [b for b in blocks if b.kind == "embed"] if first == 0 else []
    out += layers[first:end]
    out += [b for b in blocks if b.kind == "head"] if end == len(layers) else []
    return tuple(out)


def plan_cluster(blocks: Sequence[BlockSpec], nodes: Sequence[NodeSpec], workload: Workload = Workload(),
                 *, hidden_bytes_per_token: int = 0, offload: str | Mapping[str, str] = "auto",
                 prefetch_depth: int | None = None, use_all_workers: bool = True) -> ClusterPlan:
    """Split ``blocks`` (embed, layers.0 .. layers.N-1, head) into contiguous stages over ``nodes``.

    Args:
        blocks: the whole model's blocks in execution order (``runtime.planner.BlockSpec``).
        nodes: the workers, in pipeline order (one per GPU, or per CPU-only node).
        workload: batch / context / prompt for the whole model; each stage's KV cache is sized
            for its own layers only.
        hidden_bytes_per_token: bytes of hidden state sent between stages per token
            (hidden_size x element size); priced at each worker's ``net_bw`` and latency.
        offload: each stage's placement mode ("auto", "none", "cpu", "disk", or a dict of
            block/pattern -> tier; patterns that match none of a stage's blocks are ignored).
        prefetch_depth: passed to every stage's planner.
        use_all_workers: every worker that can hold a layer gets at least one (the workers
            were asked for); False lets the planner leave out workers that do not make the
            slowest stage faster (e.g. when the network hop costs more than it saves).

    Returns:
        A frozen :class:`ClusterPlan`.

    Raises:
        PlanError: no split fits the workers' budgets (the message names the closest worker).
        ValueError: bad blocks or nodes.
    """
    blocks, nodes = tuple(blocks), tuple(nodes)
    if not nodes:
        raise ValueError("plan_cluster needs at least one worker")
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"worker names must be unique, got {names}")
    n_layers = sum(b.kind == "layer" for b in blocks)
    if n_layers == 0:
        raise ValueError("the model has no decoder layers to split")
    memo: dict[tuple[int, int, int], StagePlan | None] = {}
    errors: list[PlanError] = []

    def stage(k: int, i: int, j: int) -> StagePlan | None:
        if (k, i, j) not in memo:
            memo[k, i, j] = _stage(k, nodes[k], blocks, i, j, n_layers, workload,
                                   hidden_bytes_per_token, offload, prefetch_depth, errors)
        return memo[k, i, j]

    INF = (math.inf, math.inf)
    # best[k][j]: (slowest stage, sum) for layers[:j] over workers[:k]; choice[k][j]: start of k's range
    best = [[INF] * (n_layers + 1) for _ in range(len(nodes) + 1)]
    choice: list[list[int | None]] = [[None] * (n_layers + 1) for _ in range(len(nodes) + 1)]
    best[0][0] = (0.0, 0.0)
    use_all_workers = use_all_workers and n_layers >= len(nodes)
    for k in range(len(nodes)):
        skippable = not use_all_workers or all(stage(k, i, i + 1) is None for i in range(n_layers))
        for j in range(n_layers + 1):
            if skippable:
                best[k + 1][j], choice[k + 1][j] = best[k][j], None      # worker k unused
            for i in range(j - 1, -1, -1):                                 # worker k takes i .. j-1
                if best[k][i] == INF:
                    continue
                s = stage(k, i, j)
                if s is None or s.decode_s > best[k + 1][j][0]:
                    break          # more layers only cost more (or still do not fit)
                cand = (max(best[k][i][0], s.decode_s), best[k][i][1] + s.decode_s)
                if cand < best[k + 1][j]:
                    best[k + 1][j], choice[k + 1][j] = cand, i
    if best[len(nodes)][n_layers] == INF:
        raise _no_fit(errors, n_layers, len(nodes))
    stages, j = [], n_layers
    for k in range(len(nodes), 0, -1):
        i = choice[k][j]
        if i is not None:
            stages.append((k - 1, i, j))
            j = i
    stages.reverse()
    used = {k for k, _, _ in stages}
    plans = tuple(replace(stage(k, i, j), index=idx) for idx, (k, i, j) in enumerate(stages))
    return ClusterPlan(plans, workload, n_layers, tuple(n for k, n in enumerate(nodes) if k not in used))


def _stage(k, node: NodeSpec, blocks, first: int, end: int, n_layers: int, wl: Workload,
           hidden_bytes: int, offload, prefetch_depth, errors: list) -> StagePlan | None:
    mine = stage_blocks(blocks, first, end)
    frac = (end - first) / n_layers
    swl = replace(wl, kv_bytes_per_token=math.ceil(wl.kv_bytes_per_token * frac))
    mode = stage_mode(offload, mine)
    try:
        p = planner.plan(mine, node.budgets, node.bandwidths, swl, device=node.device, mode=mode,
                         prefetch_depth=prefetch_depth, cpu_compute="never")   # as the stages run
    except PlanError as e:
        errors.append((node.name, e))
        return None
    hop = (lambda tokens: 0.0) if first == 0 else \
        (lambda tokens: node.net_latency_s + tokens * hidden_bytes / node.net_bw)
    return StagePlan(k, node, first, end, p, hop(wl.batch), hop(wl.batch * wl.prompt))


def stage_mode(offload, mine: tuple[BlockSpec, ...]):
    """A dict mode keeps only the keys that name (or match) one of this stage's blocks."""
    if not isinstance(offload, Mapping):
        return offload
    import fnmatch
    names = [b.name for b in mine]
    return {k: t for k, t in offload.items() if k in names or fnmatch.filter(names, k)}


def _no_fit(errors: list, n_layers: int, n_nodes: int) -> PlanError:
    if not errors:
        return PlanError(f"no split of {n_layers} layers over {n_nodes} workers fits", 0, 0)
    name, e = min(errors, key=lambda ne: ne[1].needed - ne[1].budget)
    return PlanError(f"the {n_layers} layers do not fit on the {n_nodes} worker(s) of the cluster; "
                     f"closest: worker {name}: {e}", e.needed, e.budget, e.resource)
