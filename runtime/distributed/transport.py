"""How the driver talks to a stage: one small ``submit(method, *args)`` / ``fetch`` transport.

A *worker* (``StageWorker``) lives where its stage runs: it reports its hardware, loads a
stage from a ``StageSpec`` (replacing the one it had) and forwards calls to it. Transports:

* ``LocalTransport``: the worker in this process, behind one thread, so several local stages
  (e.g. one per GPU) overlap on micro-batches; for tests and single-host runs.
* ``RayTransport``: the worker as a Ray actor pinned to one node (one GPU, or a CPU node).
  ``ray`` is imported here only, lazily. A dead actor or a node that left raises
  ``StageFailed`` naming the stage and its blocks, within the transport's timeout at the
  latest (Ray reports a killed actor at once, a lost node within its health-check period).

``submit`` returns a handle at once; a handle may be passed as an argument to another
submit of the same kind of transport (the value goes stage to stage, never via the driver).
"""
from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["StageFailed", "StageWorker", "LocalTransport", "RayTransport", "ray_workers", "connect"]

STAGE_METHODS = ("forward", "reset", "drop_cache", "info")
# Building a skeleton patches torch.nn.Module globally for a moment (accelerate's
# init_empty_weights), so stages of one process load one at a time.
_LOAD_LOCK = threading.Lock()


class StageFailed(RuntimeError):
    """A pipeline stage's worker died or stopped answering (its process, GPU or node is gone).

    ``stage`` names the stage ("stage 1"), ``blocks`` what it held ("layers.8-15"), ``worker``
    where it ran; ``worker_index`` is the failed worker's position in the pipeline's list.
    """

    def __init__(self, stage: str, blocks: str, worker: str, cause: str, worker_index: int | None = None):
        super().__init__(f"{stage} ({blocks or 'not loaded'}) on worker {worker} failed: {cause}")
        self.stage, self.blocks, self.worker, self.cause = stage, blocks, worker, cause
        self.worker_index = worker_index


class StageWorker:
    """Holds at most one Stage; the same class runs in-process and as a Ray actor."""

    def __init__(self, device: str | None = None, to_cpu: bool = False):
        self.device, self.to_cpu, self.stage = device, to_cpu, None

    def hardware(self, offload_dir: str | None = None) -> dict:
        """This worker's device, free memory and bandwidths (see runtime.hardware.probe)."""
        from runtime import hardware
        dev = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        hw = hardware.probe(dev, offload_dir=offload_dir)
        return {"device": dev, "device_name": hw.device_name, "device_free": hw.device_free,
                "ram_available": hw.ram_available, "bandwidths": hw.bandwidths, "host": socket.gethostname(),
                "node_id": _node_id(), "pid": os.getpid()}

    def load(self, spec) -> dict:
        """Load the stage ``spec`` (a StageSpec), closing the one held before."""
        from runtime.distributed.stage import Stage
        self.unload()
        with _LOAD_LOCK:
            self.stage = Stage(spec)
        return self.stage.info()

    def unload(self) -> None:
        if self.stage is not None:
            self.stage.close()
            self.stage = None

    def ping(self) -> int:
        return os.getpid()

    def call(self, method: str, *args):
        """Run ``method`` of the worker (hardware, load, unload, ping) or of its stage."""
        args = tuple(a.result() if isinstance(a, Future) else a for a in args)
        if self.device and self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_device(torch.device(self.device))   # this thread's streams, kernels, events
        if method in ("hardware", "load", "unload", "ping"):
            return getattr(self, method)(*args)
        if method not in STAGE_METHODS:
            raise ValueError(f"unknown stage method {method!r}; known: {STAGE_METHODS}")
        if self.stage is None:
            raise RuntimeError(f"no stage is loaded on this worker; cannot call {method!r}")
        out = getattr(self.stage, method)(*args)
        return out.cpu() if self.to_cpu and isinstance(out, torch.Tensor) else out


def _node_id() -> str:
    try:
        import ray
        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


class LocalTransport:
    """A worker in this process; calls run in order on one thread of its own."""

    kind = "local"

    def __init__(self, device: str | None = None, name: str | None = None):
        self.name = name or f"local/{device or 'default'}"
        self.worker = StageWorker(device)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"exa-{self.name}")

    def submit(self, method: str, *args) -> Future:
        return self._pool.submit(self.worker.call, method, *args)

    def fetch(self, handles: list, timeout: float | None = None) -> list:
        return [h.result(timeout) for h in handles]

    def call(self, method: str, *args, timeout: float | None = None):
        return self.fetch([self.submit(method, *args)], timeout)[0]

    def alive(self, timeout: float = 5.0) -> bool:
        return True

    def failed(self, cause: str, index: int | None = None) -> StageFailed:
        return StageFailed(getattr(self, "stage_name", self.name), getattr(self, "blocks", ""), self.name,
                           cause, index)

    def close(self) -> None:
        try:
            self.call("unload")
        finally:
            self._pool.shutdown(wait=True)


class RayTransport:
    """A StageWorker running as a Ray actor on one node (one GPU, or the node's CPUs)."""

    kind = "ray"

    def __init__(self, node_id: str, name: str, num_gpus: int = 0, num_cpus: float = 1,
                 timeout_s: float = 600.0, env: dict | None = None):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        self.name, self.node_id, self.timeout_s = name, node_id, timeout_s
        actor = ray.remote(StageWorker).options(
            num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            runtime_env={"env_vars": env} if env else None)
        self.actor = actor.remote("cuda" if num_gpus else "cpu", True)
        self.stage_name, self.blocks = name, ""          # set by the pipeline once loaded

    def submit(self, method: str, *args):
        return self.actor.call.remote(method, *args)

    def fetch(self, handles: list, timeout: float | None = None) -> list:
        """Values of ``handles``; ``StageFailed`` when the worker (or one feeding it) is gone."""
        import ray
        from ray import exceptions as rex
        fatal = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                "WorkerCrashedError", "NodeDiedError", "ObjectLostError",
                                                "OwnerDiedError", "ObjectFetchTimedOutError") if hasattr(rex, n))
        timeout = self.timeout_s if timeout is None else timeout
        try:
            return ray.get(list(handles), timeout=timeout)
        except rex.GetTimeoutError:
            raise self.failed(f"no answer within {timeout:.0f} s") from None
        except fatal as e:
            raise self.failed(f"{type(e).__name__}: {_first_line(e)}") from e
        except rex.RayTaskError as e:              # an ordinary error inside the stage: re-raise it
            cause = e.as_instanceof_cause()
            if isinstance(cause, fatal):
                raise self.failed(f"{type(cause).__name__}: {_first_line(cause)}") from e
            raise cause from None

    def call(self, method: str, *args, timeout: float | None = None):
        return self.fetch([self.submit(method, *args)], timeout)[0]

    def alive(self, timeout: float = 5.0) -> bool:
        """True when the actor answers a ping within ``timeout`` seconds (it is idle then)."""
        try:
            self.call("ping", timeout=timeout)
            return True
        except StageFailed:
            return False

    def failed(self, cause: str, index: int | None = None) -> StageFailed:
        return StageFailed(self.stage_name, self.blocks, self.name, cause, index)

    def close(self) -> None:
        import ray
        try:
            ray.kill(self.actor, no_restart=True)
        except Exception:          # already dead, or Ray is shutting down
            pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def connect(address: str = "auto") -> bool:
    """Join the Ray cluster at ``address`` ("auto": the running local one, else start one;
    "ray://host:10001": Ray client; "host:6379": a cluster's GCS), unless Ray is already up.
    Returns True when this call initialised Ray (the caller then shuts it down)."""
    try:
        import ray
    except ImportError:
        raise ImportError("cluster= needs Ray: pip install 'exa[ray]' (or 'ray[default]>=2.9')") from None
    if ray.is_initialized():
        return False
    ray.init(address=None if address == "auto" else address, logging_level="WARNING")
    return True


def ray_workers(timeout_s: float = 600.0, env: dict | None = None) -> list[RayTransport]:
    """One worker per GPU of every alive node, and one per CPU-only node (using its CPUs)."""
    import ray
    out = []
    for n in sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"]):
        res = n.get("Resources", {})
        gpus, cpus = int(res.get("GPU", 0)), res.get("CPU", 0)
        where = f"{n.get('NodeManagerAddress', '?')}/{n['NodeID'][:8]}"
        if gpus:
            per = 1 if cpus >= gpus else 0
            out += [RayTransport(n["NodeID"], f"{where}/gpu{i}", num_gpus=1, num_cpus=per,
                                 timeout_s=timeout_s, env=env) for i in range(gpus)]
        elif cpus >= 1:
            out.append(RayTransport(n["NodeID"], f"{where}/cpu", num_cpus=int(cpus), timeout_s=timeout_s, env=env))
    if not out:
        raise RuntimeError("the Ray cluster has no alive node with a GPU or a CPU to run a stage on")
    return out
