"""A small autotuner shared by the kernel launchers.

Each launcher owns one :class:`Tuner`. For a key (shape, format, M bucket, dtype) it times every
candidate config once on the real inputs, the three fastest twice more, and remembers the one
with the best median of three, so later calls cost one dict lookup. Timing replays a CUDA graph
of several launches (falls back to plain event timing when capture fails), so that the CPU's
launch overhead does not hide the GPU time of small kernels.

Picks made on a GPU are kept in ``$EXA_CACHE_DIR/tuning.json`` (keyed by kernel, GPU name and
triton version), so a machine tunes each shape once, not once per process.

A launcher may also pass ``check(cfg) -> bool``: a candidate it rejects (e.g. an experimental
kernel whose output disagrees with an established one on these inputs) is neither timed nor
picked.

Tests override the candidate lists (``Tuner.override``) with one tiny config: with a single
candidate nothing is timed, which is what the CPU interpreter needs.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
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


def agrees_with(base: Callable[[], Config | None], suspect: Callable[[Config], bool],
                run: Callable[[Config], torch.Tensor], tol: float = 3e-2) -> Callable[[Config], bool]:
    """A ``check`` for :meth:`Tuner.pick`: a ``suspect`` config (an experimental kernel) passes
    only if ``run(cfg)`` is finite and within relative difference ``tol`` (norm-wise) of
    ``run(base())``, the established kernel's output on the same inputs (run once, when first
    needed; with no base config every config passes). Other configs pass unchecked."""
    state: dict = {}

    def check(c: Config) -> bool:
        if not suspect(c):
            return True
        if "ref" not in state:
            b = base()
            state["ref"] = None if b is None else run(b).float().clone()
        ref = state["ref"]
        if ref is None:
            return True
        y = run(c).float()
        return bool(torch.isfinite(y).all()) and float((y - ref).norm()) <= tol * float(ref.norm())
    return check


def m_bucket(M: int) -> int:
    """The power of two >= M (capped at 4096): the M part of a tuning key."""
    b = 1
    while b < M and b < 4096:
        b *= 2
    return b


def cold() -> bool:
    """Whether a launcher that asks for it (weights that fit in L2) is timed with a cold L2
    (``EXA_TUNE_COLD``, default on): in a model every layer's weights are read once per step,
    so they come from HBM, while back-to-back replays of one launch find them in L2."""
    return os.environ.get("EXA_TUNE_COLD", "1") != "0"


def l2_bytes() -> int:
    """The current GPU's L2 size in bytes (0 when unknown or no GPU)."""
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 0)
    except Exception:  # noqa: BLE001
        return 0


def _flush_buffer() -> torch.Tensor:
    """A scratch tensor twice the size of the GPU's L2 (at least 64 MB): zeroing it evicts
    whatever a timed launch could otherwise find in L2."""
    return torch.empty(max(2 * l2_bytes(), 64 << 20) // 4, dtype=torch.float32, device="cuda")


def _time_cold(run: Callable[[], None], reps: int = 10, iters: int = 5) -> float:
    """Median ms per launch of ``run`` with L2 flushed before each launch: graph of
    (flush, run) pairs minus a graph of flushes alone, each the median of ``iters`` replays."""
    buf = _flush_buffer()
    both = _time_graph(lambda: (buf.zero_(), run()), reps, iters)
    alone = _time_graph(buf.zero_, reps, iters)
    return max(both - alone, 1e-6)


def _time(run: Callable[[], None], fits_l2: bool = False) -> float:
    """How the tuner times a candidate: with a cold L2 when the launcher says its weights fit
    in L2 (``fits_l2``) and ``cold()``, else back-to-back graph replays."""
    return _time_cold(run) if fits_l2 and cold() else _time_graph(run)


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


def _cache_file() -> Path:
    root = os.environ.get("EXA_CACHE_DIR") or Path.home() / ".cache" / "exa"
    return Path(root) / "tuning.json"


def _scope(name: str) -> str:
    """The disk-cache section of a tuner: kernel name, GPU and triton version."""
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "?"
    return f"{name}|{torch.cuda.get_device_name()}|triton {tv}"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(scope: str, key: str, cfg: Config) -> None:
    """Add one pick to the disk cache (read-modify-write, replaced atomically; best effort)."""
    try:
        data = _read_cache()
        data.setdefault(scope, {})[key] = cfg
        f = _cache_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        tmp.replace(f)
    except OSError:
        pass


FINALISTS = 3      # the fastest candidates of the first pass, timed twice more


def _rerank(results: list[tuple[Config, float]], time: Callable[[Config], float]
            ) -> list[tuple[Config, float]]:
    """``results`` (config, ms) sorted fastest first, the FINALISTS fastest timed twice more
    and ranked by the median of their three timings: one lucky timing (a cold-L2 time is a
    difference of two graph times, noisy for a kernel of a few us) does not make the pick."""
    results = sorted(results, key=lambda r: r[1])
    if len(results) < 2:
        return results
    final = [(c, sorted([ms, time(c), time(c)])[1]) for c, ms in results[:FINALISTS]]
    return sorted(final, key=lambda r: r[1]) + results[FINALISTS:]


class Tuner:
    """Remembers the fastest config per key; see the module docstring."""

    def __init__(self, name: str):
        self.name = name
        self.cache: dict[tuple, Config] = {}
        self.override: list[Config] | None = None     # tests: replaces every candidate list
        self.timings: dict[tuple, list[tuple[Config, float]]] = {}
        self.verbose = bool(os.environ.get("EXA_TUNE_VERBOSE"))

    def pick(self, key: tuple, candidates: Sequence[Config] | Callable[[], Sequence[Config]],
             valid: Callable[[Config], bool], launch: Callable[[Config], None], on_gpu: bool,
             check: Callable[[Config], bool] | None = None,
             fits_l2: bool | Callable[[], bool] = False) -> Config:
        """The config for ``key``; times ``launch(cfg)`` for each valid candidate the first time
        (those ``check`` accepts, when given). ``candidates`` may be a function returning them:
        it is then called only when ``key`` is not picked yet (the launchers' per-call cost).
        ``fits_l2`` (or a function answering it, called on a miss only): the launch's weights fit
        in L2, so time it with a cold L2 (``_time``)."""
        cfg = self.cache.get(key)
        if cfg is not None:
            return cfg
        if self.override is not None:
            candidates = self.override
        elif callable(candidates):
            candidates = candidates()
        cands = [c for c in candidates if valid(c)]
        persist = on_gpu and self.override is None and len(cands) > 1
        if persist:
            stored = _read_cache().get(_scope(self.name), {}).get(repr(key))
            if stored is not None and stored in cands:
                self.cache[key] = stored
                return stored
        if not cands:
            raise ValueError(f"{self.name}: no valid kernel config for {key}")
        if len(cands) == 1 or not on_gpu:
            cfg = cands[0]
        else:
            results = []
            fits_l2 = fits_l2() if callable(fits_l2) else fits_l2
            for c in cands:
                try:
                    if check is not None and not check(c):
                        warnings.warn(f"{self.name}: config {c} disagrees with the reference kernel "
                                      f"for {key}; not used")
                        continue
                    results.append((c, _time(lambda c=c: launch(c), fits_l2)))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: skip config
                    if self.verbose:
                        print(f"[{self.name}] {key} {c} failed: {type(e).__name__}: {e}")
            if not results:
                raise RuntimeError(f"{self.name}: every config failed for {key}")
            results = _rerank(results, lambda c: _time(lambda: launch(c), fits_l2))
            self.timings[key] = results
            cfg = results[0][0]
            if self.verbose:
                for c, ms in sorted(results, key=lambda r: r[1]):
                    print(f"[{self.name}] {key} {ms * 1e3:8.1f} us {c}")
        self.cache[key] = cfg
        if persist and key in self.timings:
            _write_cache(_scope(self.name), repr(key), cfg)
        return cfg
