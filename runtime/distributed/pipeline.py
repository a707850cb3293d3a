"""The pipeline driver: stages over workers, with the Engine's forward interface.

``Pipeline`` probes its workers (one per GPU or CPU node), asks the cluster planner for a
split, has every worker load its stage from the model path, and then behaves like an
``Engine`` for ``runtime.generate.generate_steps``: ``model`` (a meta skeleton, for the
config and the position limit), ``device``, ``placement`` (the ClusterPlan), ``new_cache()``
and ``forward(ids, mask, positions, cache, logits_to_keep)``.

A batch is cut into micro-batches (by rows) that enter the pipeline one after the other: with
Ray (or local threads) stage k works on micro-batch m while stage k+1 works on m-1. Each
micro-batch has its own KV cache on every stage. Only token ids, masks and hidden states go
from stage to stage (Ray object references: the driver never holds the hidden states).

Concurrent requests (several threads calling ``forward`` / ``generate_steps``) share the
stages the same way: every request has its own caches (``PipelineCache``: ids never reused),
and a step submits its whole chain of stage calls at once under a short lock, so every worker
sees the steps of all requests in one order and runs them in it (transports serialise calls
per worker, in submission order). No lock is held while a stage computes: stage k works on
request A's step while stage k-1 works on request B's. Requests wait for room in the KV cache
the planner reserved (``batch_size x max_context`` tokens, see ``requests.KVAdmission``).

With ``retry=True`` a ``StageFailed`` makes the driver drop the dead workers, re-plan over the
ones left, reload the stages and run the request again from the prompt (sampling without a
seed gets one, so the replay reproduces the tokens already handed out, which are skipped).
With concurrent requests each one retries on its own: the first to see the failure re-plans
(under the lock; the others wait for it), a request whose caches the reload dropped (an older
*epoch*) restarts from its prompt.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import threading
from typing import Iterator, Sequence

import torch

from runtime import planner
from runtime.distributed.cluster_plan import ClusterPlan, NodeSpec, plan_cluster
from runtime.distributed.requests import KVAdmission, PipelineCache, RequestView
from runtime.distributed.stage import StageSpec
from runtime.distributed.transport import LocalTransport, StageFailed
from runtime.engine import act_bytes_per_token, default_dtype, kv_bytes_per_token
from runtime.generate import Sampling, _is_count, generate_steps
from runtime.units import parse_size

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 4 * 3600.0        # loading a large stage from a slow disk; dead workers fail at once
__all__ = ["Pipeline", "PipelineCache", "make_workers"]


def make_workers(cluster) -> tuple[list, bool]:
    """(workers, started_ray) for ``cluster``: a list of devices -> local workers in this
    process; "auto" / an address -> one Ray worker per GPU or CPU node of that cluster."""
    if isinstance(cluster, (list, tuple)):
        if not cluster:
            raise ValueError("cluster=[] names no device; give e.g. ['cuda:0', 'cuda:1']")
        return [LocalTransport(str(d), name=f"local/{d}#{i}") for i, d in enumerate(cluster)], False
    if not isinstance(cluster, str) or not cluster:
        raise ValueError(f"cluster must be None, 'auto', a Ray address or a list of devices, got {cluster!r}")
    import os

    from runtime.distributed import transport
    started = transport.connect(cluster)
    env = {k: v for k, v in os.environ.items() if k == "EXA_NO_MEASURE"}
    return transport.ray_workers(env=env or None), started


class Pipeline:
    """A model split into pipeline stages over ``workers`` (see the module docstring).

    Args:
        model: the model path; every worker reads its own blocks from it (a shared or copied
            path on every machine).
        config: the model's transformers config.
        workers: transports (``LocalTransport`` / ``RayTransport``), in pipeline order.
        retry: on a failed stage, re-plan over the workers left and re-run the request.
        micro_batches: rows of a batch are cut into this many micro-batches (default: one per
            stage, at most one per row).
        dtype: compute dtype of every stage (default: bf16/fp16 when any worker has a GPU,
            else float32).
        max_gpu_memory, max_cpu_memory, max_disk: budgets *per worker* (a GPU's VRAM; host
            RAM; on a CPU worker max_cpu_memory is its whole budget); default: what each
            worker has free (host RAM shared by the workers of one node).
        load: False plans only (``placement``), nothing is loaded (``exa plan --cluster``).
        Other keyword arguments are those of ``exa.Inference`` and apply to every stage.
    """

    def __init__(self, model: str, config, workers: Sequence, *, retry: bool = False,
                 micro_batches: int | None = None, offload="auto", max_gpu_memory=None, max_cpu_memory=None,
                 max_disk=None, offload_dir: str | None = None, dtype: torch.dtype | None = None,
                 prefetch_depth: int | None = None, batch_size: int = 1, max_context: int = 2048,
                 quant=None, skip_modules=("lm_head",), trust_remote_code: bool = False,
                 progress: bool = False, bandwidths: planner.Bandwidths | None = None, owns_ray: bool = False,
                 load: bool = True):
        from runtime.loader import assign_layouts, build_skeleton, define_blocks, quantize_skeleton
        self.model_path, self.config, self.workers = str(model), config, list(workers)
        self.retry, self.micro_batches, self._owns_ray = retry, micro_batches, owns_ray
        self.device = torch.device("cpu")                  # where results come back
        self.batch_size, self.max_context = batch_size, max_context
        self._budgets = {k: parse_size(v, k) if v is not None else None for k, v in
                         (("max_gpu_memory", max_gpu_memory), ("max_cpu_memory", max_cpu_memory),
                          ("max_disk", max_disk))}
        self._bandwidths, self._offload = bandwidths, offload
        self._lock = threading.RLock()    # held to submit one step's calls, and to re-plan
        self._ids, self._epoch = itertools.count(1), 0      # cache ids; reloads of the stages
        self._kv = KVAdmission(None)
        self.stages: list[tuple[object, object]] = []      # (transport, StagePlan)
        try:
            self._hw = self._gather([(w, "hardware", offload_dir) for w in self.workers])
            cuda = any(h["device"].startswith("cuda") for h in self._hw)
            self.dtype = dtype or default_dtype(config, torch.device("cuda" if cuda else "cpu"))
            self.model, arch = build_skeleton(config, trust_remote_code)   # meta: for generate_steps
            if quant is not None:
                quantize_skeleton(self.model, quant, skip_modules)
            self._blocks = define_blocks(self.model, arch)
            assign_layouts(self.model, self._blocks, self.dtype)
            self._spec = StageSpec(self.model_path, 0, 1, offload=offload, dtype=self.dtype,
                                   offload_dir=offload_dir, prefetch_depth=prefetch_depth,
                                   batch_size=batch_size, max_context=max_context,
                                   quant=quant, skip_modules=tuple(skip_modules),
                                   trust_remote_code=trust_remote_code, progress=progress)
            if load:
                self._build()
            else:
                self.placement = self.plan_for(self.workers)
        except BaseException:
            self.close()
            raise

    # -- planning and loading -----------------------------------------------------------------
    def plan_for(self, workers: Sequence) -> ClusterPlan:
        """The split over ``workers`` (a subset of this pipeline's, in order)."""
        idx = [self.workers.index(w) for w in workers]
        per_node: dict[str, int] = {}
        for i in idx:
            per_node[self._hw[i]["node_id"]] = per_node.get(self._hw[i]["node_id"], 0) + 1
        nodes = [self._node(self.workers[i], self._hw[i], per_node[self._hw[i]["node_id"]]) for i in idx]
        blocks = [planner.BlockSpec(b.name, b.nbytes, b.kind, 2.0 * b.numel) for b in self._blocks]
        wl = planner.Workload(batch=self.batch_size, context=self.max_context, prompt=min(512, self.max_context),
                              kv_bytes_per_token=kv_bytes_per_token(self.config, self.dtype),
                              act_bytes_per_token=act_bytes_per_token(self.config, self.dtype))
        hidden = self.config.hidden_size * torch.empty((), dtype=self.dtype).element_size()
        return plan_cluster(blocks, nodes, wl, hidden_bytes_per_token=hidden, offload=self._offload,
                            prefetch_depth=self._spec.prefetch_depth)

    def _node(self, worker, hw: dict, sharing: int) -> NodeSpec:
        b, ram = self._budgets, hw["ram_available"] // max(1, sharing)
        if hw["device"].startswith("cuda"):
            dev = b["max_gpu_memory"] if b["max_gpu_memory"] is not None else int(hw["device_free"] * 0.92)
            cpu = b["max_cpu_memory"] if b["max_cpu_memory"] is not None else int(ram * 0.7)
            kind = "cuda"
        else:
            dev = b["max_cpu_memory"] if b["max_cpu_memory"] is not None else int(ram * 0.8)
            cpu, kind = 0, "cpu"
        bw = self._bandwidths or hw["bandwidths"]
        net = {"net_bw": max(bw.h2d, 10e9), "net_latency_s": 2e-5} if worker.kind == "local" else {}
        return NodeSpec(worker.name, kind, planner.Budgets(dev, cpu, b["max_disk"]), bw, **net)

    def _build(self) -> None:
        """Plan over the current workers and have each load its stage (in parallel)."""
        self.placement = plan = self.plan_for(self.workers)
        by_name = {w.name: w for w in self.workers}
        self.stages, jobs = [], []
        for s in plan.stages:
            w = by_name[s.node.name]
            w.stage_name, w.blocks = f"stage {s.index}", s.describe()
            b = s.node.budgets
            spec = dataclasses.replace(
                self._spec, first=s.first, end=s.end, name=f"stage {s.index}",
                max_gpu_memory=b.device if s.node.device == "cuda" else None,
                max_cpu_memory=b.cpu if s.node.device == "cuda" else b.device, max_disk=b.disk,
                bandwidths=s.node.bandwidths)
            self.stages.append((w, s))
            jobs.append((w, "load", spec))
        self.stage_info = self._gather(jobs, timeout=LOAD_TIMEOUT_S)
        for n in plan.unused:
            by_name[n.name].call("unload")
        self._kv.set_capacity(plan.workload.batch * plan.workload.context)

    def _gather(self, jobs: list, timeout: float | None = None) -> list:
        """Submit ``(worker, method, *args)`` jobs at once, then collect them in order."""
        handles = [(w, w.submit(m, *a)) for w, m, *a in jobs]
        return [w.fetch([h], timeout)[0] for w, h in handles]

    # -- the Engine interface -------------------------------------------------------------------
    def new_cache(self) -> PipelineCache:
        """A fresh KV cache on every stage (made there on first use); ``release()`` or garbage
        collection drops it. The caches of other requests are left alone."""
        with self._lock:
            return PipelineCache(next(self._ids), self._epoch, self._drop_cache)

    def _drop_cache(self, id: int, epoch: int, parts: list) -> None:
        """Drop the caches ``(id, m)`` on every stage, not waited for (after a reload there is
        nothing to drop). Takes no lock: it may run from the garbage collector in any thread,
        and the cache's last forward is in every worker's queue before this call."""
        stages = self.stages
        if epoch != self._epoch:
            return
        for w, _ in stages:
            for m in range(parts[0]):
                try:
                    w.submit("drop_cache", (id, m))
                except Exception as e:       # closed, or Ray shutting down
                    log.debug("dropping cache %s on %s: %s", id, w.name, e)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: PipelineCache | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``[B, S', V]`` on the CPU, as ``Engine.forward``; ``cache`` from ``new_cache``."""
        while True:          # each recovery drops at least one worker, or raises
            try:
                return self._forward(input_ids, attention_mask, position_ids, cache, logits_to_keep)
            except StageFailed as e:
                if not (self.retry and cache is None):      # a cached request restarts from its prompt
                    raise
                self.recover(e)

    def _forward(self, ids, mask, pos, cache, keep) -> torch.Tensor:
        rows = ids.shape[0]
        with self._lock:     # one step's calls enter every worker's queue together; nothing waits here
            epoch, stages, workers = self._epoch, list(self.stages), list(self.workers)
            if not stages:
                raise RuntimeError("this pipeline is closed")
            if cache is not None and cache.epoch != epoch:
                e = StageFailed("every stage", "", "-", "the stages were reloaded after a failure; "
                                "this request's KV caches are gone (run it again from its prompt)")
                e.epoch = cache.epoch
                raise e
            n = max(1, min(rows, self.micro_batches or len(stages)))
            bounds = [(rows * m // n, rows * (m + 1) // n) for m in range(n)]
            if cache is not None:
                cache.use(n)
            outs = []
            for m, (a, b) in enumerate(bounds):
                x = ids[a:b]
                for k, (w, _) in enumerate(stages):
                    last = k == len(stages) - 1
                    x = w.submit("forward", x, None if mask is None else mask[a:b],
                                 None if pos is None else pos[a:b], None if cache is None else (cache.id, m),
                                 keep if last else 0)
                outs.append(x)
        try:
            return torch.cat(stages[-1][0].fetch(outs), dim=0)
        except StageFailed as e:
            failure = self._diagnose(e, workers)
            failure.epoch = epoch
            raise failure from e

    def _diagnose(self, e: StageFailed, workers: list) -> StageFailed:
        """The failure of the first worker that does not answer a ping (else ``e``)."""
        for i, w in enumerate(workers):
            if not w.alive(timeout=10.0):
                return w.failed("the worker is gone (its process or node died)", i)
        return e

    def recover(self, failure: StageFailed) -> None:
        """Drop dead workers, re-plan over the others and reload the stages.

        Raises ``failure`` again when every worker still answers (nothing to leave out), and
        ``StageFailed`` when no worker is left. With concurrent requests the first one to get
        here re-plans; a failure seen before that (an older epoch) returns at once, to retry."""
        with self._lock:
            if getattr(failure, "epoch", self._epoch) != self._epoch:
                return                   # another request already re-planned after this failure
            self._recover(failure)

    def _recover(self, failure: StageFailed) -> None:
        dead = {i for i, w in enumerate(self.workers) if not w.alive(timeout=10.0)}
        dead |= {failure.worker_index} if failure.worker_index is not None else set()
        if not dead:
            raise failure
        survivors = [w for i, w in enumerate(self.workers) if i not in dead]
        log.warning("exa: %s; re-planning over %d remaining worker(s)", failure, len(survivors))
        self._epoch += 1                 # every stage is reloaded: the caches of every request go
        for i in sorted(dead):
            try:
                self.workers[i].close()
            except Exception as e:       # a dead worker: nothing left to release
                log.debug("closing %s: %s", self.workers[i].name, e)
        self.workers, self._hw = survivors, [h for i, h in enumerate(self._hw) if i not in dead]
        if not survivors:
            self.stages = []
            raise StageFailed("every stage", "", "-", "no worker is left to re-plan on") from failure
        self._build()

    def generate_steps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                       sampling: Sampling, eos_ids: set[int], pad_id: int) -> Iterator[torch.Tensor]:
        """``runtime.generate.generate_steps`` over the pipeline, re-run from the prompt after
        a failed stage when ``retry`` is on (steps already yielded are not yielded again).

        Safe to run from several threads at once: each request has its own KV caches
        (released when it ends) and first waits for room in the stages' KV budget."""
        if self.retry and sampling.temperature > 0 and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=random.randrange(2**31))
        valid = input_ids.dim() == 2 and _is_count(max_new_tokens)   # else generate_steps says why
        ticket = self._kv.acquire(input_ids.shape[0] * (input_ids.shape[1] + int(max_new_tokens))) \
            if valid else None
        try:
            done = 0
            while True:
                run = RequestView(self)
                try:
                    for i, nxt in enumerate(generate_steps(run, input_ids, attention_mask, max_new_tokens,
                                                           sampling, eos_ids, pad_id)):
                        if i >= done:
                            done += 1
                            yield nxt
                    return
                except StageFailed as e:
                    if not self.retry:
                        raise
                    self.recover(e)
                finally:
                    run.release()        # nothing to drop when the stages were reloaded
        finally:
            self._kv.release(ticket)

    def close(self) -> None:
        """Unload every stage and stop the workers (and Ray, when this pipeline started it)."""
        with self._lock:
            workers, self.workers, self.stages = getattr(self, "workers", []), [], []
            self._epoch += 1
        for w in workers:
            try:
                w.close()
            except Exception as e:          # a dead worker: nothing left to release
                log.debug("closing %s: %s", w.name, e)
        if self._owns_ray:
            import ray
            ray.shutdown()
            self._owns_ray = False
