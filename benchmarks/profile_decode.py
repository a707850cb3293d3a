"""Where a decode step's time goes: torch.profiler over a few greedy steps of an exa model.

    python benchmarks/profile_decode.py MODEL_DIR [--cap 24GiB] [--batch 1] [--steps 6] [--out DIR]

Prints (and writes to DIR/profile_*.txt) the ops by self CPU time and by GPU time, the number of
kernel launches per step, and the step time with and without the profiler. With no --cap every
block is resident (offload="none"), which shows the per-layer fixed cost that no bandwidth hides.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import exa  # noqa: E402
from runtime.units import parse_size  # noqa: E402


def _steps(engine, ids, n):
    from runtime.generate import Sampling, engine_steps
    stamps = []
    for _ in engine_steps(engine, ids, torch.ones_like(ids), n + 1, Sampling(), set(), 0):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def _time_stage_calls() -> dict:
    """Wrap the stage workers' ``call`` to record wall seconds per (method, device)."""
    from collections import defaultdict
    from runtime.distributed import transport
    calls: dict = defaultdict(list)
    inner = transport.StageWorker.call

    def call(self, method, *args):
        t = time.perf_counter()
        try:
            return inner(self, method, *args)
        finally:
            calls[f"{method}@{self.device}#{id(self) % 997}"].append(time.perf_counter() - t)
    transport.StageWorker.call = call
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--cap", default=None, help="VRAM cap (offload='auto'); default: all resident")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cluster", default=None, help="pipeline stages, e.g. cuda:0,cuda:1 (threads of this process)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    calls = _time_stage_calls() if a.cluster else None
    cuda = torch.cuda.is_available()
    kw = {"device": "cuda" if cuda else "cpu", "progress": False, "batch_size": a.batch,
          "max_context": a.prompt + 2 * a.steps + 16}
    if a.cap:
        kw.update(offload="auto", max_gpu_memory=a.cap)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, parse_size(a.cap) / torch.cuda.get_device_properties(0).total_memory))
    else:
        kw.update(offload="none")
    if a.cluster:
        kw.pop("device")
        kw.update(cluster=a.cluster.split(","), offload="auto", cpu_compute="never")
    llm = exa.Inference(a.model, **kw)
    print(llm.plan.table(), flush=True)
    ids = torch.randint(0, llm.engine.config.vocab_size, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0))
    plain = _steps(llm.engine, ids, a.steps)                # also the warm-up (autotuning, caches)
    if calls is not None:
        calls.clear()
    plain = _steps(llm.engine, ids, a.steps)
    stage_line = ""
    if calls is not None:
        per = {k: (len(v) / (a.steps + 1), sum(v) / (a.steps + 1) * 1e3) for k, v in calls.items()}
        stage_line = "stage calls per step (count, ms of wall time on the worker threads): " + \
            ", ".join(f"{k} {n:.1f} x = {ms:.2f} ms" for k, (n, ms) in sorted(per.items()))
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        profiled = _steps(llm.engine, ids, a.steps)
    ev = prof.key_averages()
    n_steps = a.steps + 1                                   # the prefill is inside the profile too
    kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else 0
    head = (f"decode step (median, no profiler): {sorted(plain)[len(plain) // 2] * 1e3:.2f} ms; "
            f"with profiler {sorted(profiled)[len(profiled) // 2] * 1e3:.2f} ms; "
            f"GPU kernels per step (prefill included, /{n_steps}): {kernels / n_steps:.0f}")
    by_cpu = ev.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)
    by_gpu = ev.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70) if cuda else ""
    head = head + ("\n" + stage_line if stage_line else "")
    print(head, by_cpu, by_gpu, sep="\n", flush=True)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{'cluster' if a.cluster else 'resident' if not a.cap else a.cap}_b{a.batch}"
        (out / f"profile_{tag}.txt").write_text("\n".join([head, llm.plan.table(), by_cpu, by_gpu]))
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
