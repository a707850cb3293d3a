"""The copy engine: a ring of slots on the compute device, filled ahead of use.

Streamed blocks are visited in one fixed cyclic order (embed, layers..., head, then the next
forward pass starts over), so the ring can always load the next ``depth`` blocks while the
current one computes, across forward passes too. With hybrid execution a phase skips the
blocks it computes on the CPU: between passes the executor calls ``set_order`` with that
phase's order; the blocks already in flight are kept when they are the new cycle's first ones,
else the ring is drained and restarts (once per phase switch at most). Sources:

* a host buffer (pinned RAM) -> one ``copy_`` on a dedicated CUDA copy stream, ordered by
  events: ``free[slot]`` (compute finished reading the slot) and ``ready[slot]`` (copy done);
  on a CPU compute device a plain copy into the slot;
* a disk block -> a reader thread reads it (O_DIRECT where possible) into the slot's pinned
  staging buffer, then copies it up on the copy stream; on a CPU-only machine the reader thread
  reads straight into the slot.

The compute side calls ``acquire(name)`` (waits, returns the slot bytes) and ``release(name)``
(marks the slot free and issues the next block into it).
"""
from __future__ import annotations

import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from runtime.tiers import aligned_empty


@dataclass(frozen=True)
class Source:
    tier: str                                # "cpu" (a host buffer) | "disk" (a store key)
    nbytes: int
    host: torch.Tensor | None = None         # tier "cpu": 1-D uint8 (pinned when CUDA)
    store: object | None = None              # tier "disk": a DiskStore
    key: str | None = None


class Prefetcher:
    def __init__(self, order: list[str], sources: dict[str, Source], nslots: int, device: torch.device):
        if not order:
            raise ValueError("nothing to stream")
        self.order, self.sources, self.device = list(order), sources, device
        self.cuda = device.type == "cuda"
        nslots = max(1, min(nslots, len(order)))
        slot_bytes = max(s.nbytes for s in sources.values())
        uses_disk = any(s.tier == "disk" for s in sources.values())
        if self.cuda:
            self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(nslots)]
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(nslots)]
            self.free = [torch.cuda.Event() for _ in range(nslots)]
            self.staging = [aligned_empty(slot_bytes, pin=True) for _ in range(nslots)] if uses_disk else []
        else:
            self.slots = [aligned_empty(slot_bytes) for _ in range(nslots)]
        self.pool = ThreadPoolExecutor(nslots, thread_name_prefix="exa-reader") if uses_disk else None
        self.pending: collections.deque = collections.deque()   # (name, slot, wait)
        self.current: dict[str, int] = {}
        self.cursor = 0
        self.bytes_streamed = 0

    # -- compute side ---------------------------------------------------------------------
    def set_order(self, order: list[str]) -> None:
        """Cycle through ``order`` (a subset of the sources, possibly empty) from the next pass on.

        Call between passes only. In-flight loads are kept when they are the first blocks of the
        new cycle; otherwise they are drained first (``reset``).
        """
        order = list(order)
        if order == self.order:
            return
        if self.current:
            raise RuntimeError(f"set_order during a pass (blocks {sorted(self.current)} are in use)")
        missing = [n for n in order if n not in self.sources]
        if missing:
            raise ValueError(f"set_order: no source for {missing[:3]}")
        flight = [name for name, _, _ in self.pending]
        if not order or flight != [order[i % len(order)] for i in range(len(flight))]:
            self.reset()
        self.order = order
        self.cursor = len(self.pending) % len(order) if order else 0

    def acquire(self, name: str) -> torch.Tensor:
        """Wait until block ``name`` is in its slot; returns the slot's bytes."""
        if not self.pending and not self.current:
            for slot in range(len(self.slots)):
                self._issue(slot)
        if not self.order:
            raise RuntimeError(f"prefetch order broken: asked for {name!r}, but this phase streams nothing")
        if not self.pending or self.pending[0][0] != name:
            expected = self.pending[0][0] if self.pending else None
            self.reset()
            raise RuntimeError(f"prefetch order broken: asked for {name!r}, next in the ring is {expected!r}")
        _, slot, wait = self.pending.popleft()
        wait()
        self.current[name] = slot
        return self.slots[slot][: self.sources[name].nbytes]

    def release(self, name: str) -> None:
        """The compute side is done with ``name``: free its slot and load the next block into it."""
        slot = self.current.pop(name)
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))
        self._issue(slot)

    def reset(self) -> None:
        """Drain in-flight loads and restart the cycle (after an error or an aborted pass)."""
        for _, _, wait in self.pending:
            try:
                wait()
            except Exception:
                pass
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.pending.clear()
        self.current.clear()
        self.cursor = 0

    def close(self) -> None:
        self.reset()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    # -- copy side ------------------------------------------------------------------------
    def _issue(self, slot: int) -> None:
        if not self.order:
            return
        name = self.order[self.cursor]
        self.cursor = (self.cursor + 1) % len(self.order)
        src = self.sources[name]
        self.bytes_streamed += src.nbytes
        if src.tier == "cpu":
            wait = self._copy_up(slot, src.host, src.nbytes)
        elif src.tier == "disk":
            wait = self._read(slot, src)
        else:
            raise ValueError(f"block {name!r}: cannot stream from tier {src.tier!r}")
        self.pending.append((name, slot, wait))

    def _copy_up(self, slot: int, host: torch.Tensor, n: int) -> Callable[[], None]:
        if not self.cuda:                        # a CPU compute device: the slot is host memory too
            self.slots[slot][:n].copy_(host[:n])
            return lambda: None
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])
            self.slots[slot][:n].copy_(host[:n], non_blocking=True)
            self.ready[slot].record(self.copy_stream)
        ready, dev = self.ready[slot], self.device
        return lambda: torch.cuda.current_stream(dev).wait_event(ready)

    def _read(self, slot: int, src: Source) -> Callable[[], None]:
        if not self.cuda:
            fut = self.pool.submit(src.store.read_into, src.key, self.slots[slot])
            return lambda: fut.result()

        def job() -> None:
            staging = self.staging[slot]
            src.store.read_into(src.key, staging)
            self._copy_up(slot, staging, src.nbytes)
            self.ready[slot].synchronize()       # the staging buffer is free again

        fut = self.pool.submit(job)
        ready, dev = self.ready[slot], self.device

        def wait() -> None:
            fut.result()
            torch.cuda.current_stream(dev).wait_event(ready)
        return wait
