"""Prefill as dequantize + cuBLAS with scratch chunks small enough to stay in L2 (an experiment).

``runtime/kernels/dequant.py`` dequantizes a 64 or 256 MiB chunk of W's rows into a scratch
buffer, then multiplies it with cuBLAS; the chunk round-trips through HBM (~2.5 bytes per weight).
With a chunk that fits the GPU's L2 (50 MB on an H100), the multiply could read it from L2
instead. This times, per Llama shape and M, on int4 g128 weights:

* cuBLAS bf16 on the unquantized weights (the bound the issue states: % of cuBLAS);
* exa's tuned prefill op (``dispatch.quant_linear``: fused GEMM or dequant + cuBLAS);
* dequantize + cuBLAS with chunks of 256 ... 4096 rows and the default 64 MiB,

each both from CUDA-graph replays (``graph``: device time) and launched eagerly (``eager``: what
the engine's eager prefill sees, host launch gaps included), weights cycled over >= 256 MB.

    python3 benchmarks/prefill_chunks.py --out prefill_chunks.json [--m 256,512] [--shapes 28672x8192,...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.kernels import SPECS, bench, copies_for, packed_bytes, rel_err  # noqa: E402
from runtime.kernels import dispatch, reference as R  # noqa: E402
from runtime.kernels.dequant import chunk_rows, dequantize_rows  # noqa: E402

SPEC = SPECS["exa-int4-g128"]
ROWS = [256, 512, 1024, 2048, 4096]


def eager(fn) -> float:
    """Median ms of ``fn`` launched in a plain loop (host launch time included when it dominates)."""
    import triton.testing as tt
    return float(tt.do_bench(fn, warmup=10, rep=100, return_mode="median"))


def chunked(x, t, N, K, step, scratch, out):
    for n0 in range(0, N, step):
        rows = min(step, N - n0)
        w = dequantize_rows(t, SPEC, N, K, n0, rows, x.dtype, out=scratch)
        torch.mm(x, w.t(), out=out[:, n0:n0 + rows])
    return out


def run_shape(N, K, ms, gen, rows_out):
    dev = "cuda"
    w16 = [(torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(torch.bfloat16)
           for _ in range(copies_for(N * K * 2))]
    ts = [R.random_quantized(SPEC, N, K, device=dev, generator=gen)]
    ts += [R.random_quantized(SPEC, N, K, device=dev, generator=gen) for _ in range(copies_for(packed_bytes(ts[0])) - 1)]
    w_ref = R.dequant(ts[0], SPEC, N, K, torch.float32)
    for M in ms:
        x = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
        out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)

        def add(impl, fn, n):
            rows_out.append(dict(N=N, K=K, M=M, impl=impl, graph_ms=bench(fn) / n, eager_ms=eager(fn) / n))
            r = rows_out[-1]
            print(f"{N}x{K} M={M} {impl:>14}: graph {r['graph_ms'] * 1e3:7.1f} us  eager {r['eager_ms'] * 1e3:7.1f} us",
                  flush=True)
        add("cublas-bf16", lambda: [torch.mm(x, w.t(), out=out) for w in w16], len(w16))
        dispatch.quant_linear(x, ts[0], SPEC, N, K)                                   # tune first
        add("exa-tuned", lambda: [dispatch.quant_linear(x, t, SPEC, N, K) for t in ts], len(ts))
        for step in sorted({min(r, N) for r in ROWS} | {chunk_rows(N, K)}):
            scratch = torch.empty(step, K, device=dev, dtype=torch.bfloat16)
            err = rel_err(chunked(x, ts[0], N, K, step, scratch, out), x.float() @ w_ref.T)
            assert err < 1e-2, (N, K, M, step, err)
            add(f"chunk-{step}", lambda: [chunked(x, t, N, K, step, scratch, out) for t in ts], len(ts))
            rows_out[-1].update(scratch_mb=round(step * K * 2 / 2 ** 20, 1), err=err)
        del x, out
    del w16, ts, w_ref
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="256,512")
    ap.add_argument("--shapes", default="28672x8192,8192x28672,8192x8192,14336x4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list[dict] = []
    for s in args.shapes.split(","):
        N, K = map(int, s.split("x"))
        run_shape(N, K, [int(m) for m in args.m.split(",")], gen, rows)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
