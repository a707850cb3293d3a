"""Per-request state of a Pipeline, so that concurrent requests share its stages.

* ``PipelineCache``: names one request's KV caches on every stage (one per micro-batch,
  keys ``(id, m)``). Ids are never reused, so requests never see each other's caches; a
  cache belongs to the pipeline's *epoch* (bumped when a failure makes it re-plan and reload
  its stages, which drops every cache): a cache of an older epoch is refused, never silently
  replaced by an empty one. ``release()`` (or garbage collection) drops it on the stages.
* ``RequestView``: what ``runtime.generate.generate_steps`` sees as its engine for one
  request: the pipeline, except that the caches it makes are remembered and released when the
  request ends.
* ``KVAdmission``: concurrent requests share the KV cache the planner reserved on every stage
  (``batch_size x max_context`` tokens); a request waits until its tokens fit next to those
  of the requests in flight.
"""
from __future__ import annotations

import threading
import weakref

__all__ = ["KVAdmission", "PipelineCache", "RequestView"]


class PipelineCache:
    """A handle naming one request's KV cache on every stage (one per micro-batch)."""

    __slots__ = ("__weakref__", "_finalizer", "_parts", "epoch", "id")

    def __init__(self, id: int, epoch: int = 0, drop=None):
        self.id, self.epoch = id, epoch
        self._parts = [0]                # micro-batches used so far (keys (id, 0..n-1)), shared
        self._finalizer = None
        if drop is not None:             # drop(id, epoch, parts): on release or garbage collection
            self._finalizer = weakref.finalize(self, drop, id, epoch, self._parts)
            self._finalizer.atexit = False

    @property
    def parts(self) -> int:
        return self._parts[0]

    def use(self, parts: int) -> None:
        self._parts[0] = max(self._parts[0], parts)

    def release(self) -> None:
        """Drop this cache on every stage (once; later calls do nothing)."""
        if self._finalizer is not None:
            self._finalizer()


class RequestView:
    """The pipeline as one request's engine: its ``new_cache()`` handles are kept and released
    together by ``release()``; every other attribute is the pipeline's."""

    def __init__(self, pipeline):
        self._pipeline, self.caches = pipeline, []

    def __getattr__(self, name):
        return getattr(self._pipeline, name)

    def new_cache(self) -> PipelineCache:
        cache = self._pipeline.new_cache()
        self.caches.append(cache)
        return cache

    def release(self) -> None:
        for c in self.caches:
            c.release()
        self.caches = []


class KVAdmission:
    """Tokens of KV cache reserved by the requests in flight, at most ``capacity`` in all.

    ``acquire(tokens)`` waits while the request would not fit next to the others; a request
    larger than the whole capacity is not held back (the decode loop rejects it with a clear
    error). A thread that would wait only for requests it started itself (generators it has
    not finished) gets a ``RuntimeError`` instead of waiting for ever.
    """

    def __init__(self, capacity: int | None):
        self.capacity, self.used = capacity, 0
        self._held: dict[int, tuple[int, int]] = {}      # ticket -> (tokens, thread id)
        self._next, self._cond = 0, threading.Condition()

    def set_capacity(self, capacity: int | None) -> None:
        with self._cond:
            self.capacity = capacity
            self._cond.notify_all()

    def acquire(self, tokens: int) -> int | None:
        """Reserve ``tokens``; returns a ticket for ``release`` (None: nothing was reserved)."""
        me = threading.get_ident()
        with self._cond:
            if self.capacity is None or tokens > self.capacity:
                return None
            while self.used + tokens > self.capacity:
                if all(t == me for _, t in self._held.values()):
                    raise RuntimeError(
                        f"this request's KV cache ({tokens} tokens) does not fit next to the "
                        f"{self.used} tokens of unfinished generations started by this same thread "
                        f"(the stages reserve batch_size x max_context = {self.capacity} tokens): "
                        "finish or close them first, run requests from separate threads, or load "
                        "with a larger batch_size / max_context")
                self._cond.wait()
            self._next += 1
            self._held[self._next] = (tokens, me)
            self.used += tokens
            return self._next

    def release(self, ticket: int | None) -> None:
        if ticket is None:
            return
        with self._cond:
            tokens, _ = self._held.pop(ticket, (0, 0))
            self.used -= tokens
            self._cond.notify_all()
