"""A small autotuner shared by the kernel launchers.

Each launcher owns one :class:`Tuner`. For a key (shape, format, M bucket, dtype) it times every
candidate config once on the real inputs and remembers the fastest, so later calls cost one dict
lookup. Timing replays a CUDA graph of several launches (falls back to plain event timing when
capture fails), so that the CPU's launch overhead does not hide the GPU time of small kernels.

Tests override the candidate lists (``Tuner.override``) with one tiny config: with a single
candidate nothing is timed, which is what the CPU interpreter needs.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

Config = dict


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # noqa: BLE001 - older triton
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def m_bucket(M: int) -> int:
    """The power of two >= M (capped at 4096): the M part of a tuning key."""
    b = 1
    while b < M and b < 4096:
        b *= 2
    return b


def _time_graph(run: Callable[[], None], reps: int = 20, iters: int = 5) -> float:
    """Median ms per launch of ``run`` measured over replays of a captured graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()                                   # compile + warm caches outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                run()
        replay = graph.replay
        n = reps
    except Exception:                           # noqa: BLE001 - any capture failure: time eagerly
        torch.cuda.synchronize()
        replay, n = run, 1
    replay()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / n)
    times.sort()
    return times[len(times) // 2]


class Tuner:
    """Remembers the fastest config per key; see the module docstring."""

    def __init__(self, name: str):
        self.name = name
        self.cache: dict[tuple, Config] = {}
        self.override: list[Config] | None = None     # tests: replaces every candidate list
        self.timings: dict[tuple, list[tuple[Config, float]]] = {}
        self.verbose = bool(os.environ.get("EXA_TUNE_VERBOSE"))

    def pick(self, key: tuple, candidates: Sequence[Config], valid: Callable[[Config], bool],
             launch: Callable[[Config], None], on_gpu: bool) -> Config:
        """The config for ``key``; times ``launch(cfg)`` for each valid candidate the first time."""
        cfg = self.cache.get(key)
        if cfg is not None:
            return cfg
        cands = [c for c in (self.override if self.override is not None else candidates) if valid(c)]
        if not cands:
            raise ValueError(f"{self.name}: no valid kernel config for {key}")
        if len(cands) == 1 or not on_gpu:
            cfg = cands[0]
        else:
            results = []
            for c in cands:
                try:
                    results.append((c, _time_graph(lambda c=c: launch(c))))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip config
                    if self.verbose:
                        print(f"[{self.name}] {key} {c} failed: {type(e).__name__}: {e}")
            if not results:
                raise RuntimeError(f"{self.name}: every config failed for {key}")
            self.timings[key] = results
            cfg = min(results, key=lambda r: r[1])[0]
            if self.verbose:
                for c, ms in sorted(results, key=lambda r: r[1]):
                    print(f"[{self.name}] {key} {ms * 1e3:8.1f} us {c}")
        self.cache[key] = cfg
        return cfg
