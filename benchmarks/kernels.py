"""Quantized-matmul kernel benchmark on the GPU: Exa's Triton kernels vs bitsandbytes vs cuBLAS.

For Llama-3-8B / 70B layer shapes (N x K) at M = 1, 4, 16 (decode, memory-bound) and 256, 2048
(prefill, compute-bound), in one run:

* exa int4 (group 128, GPTQ-style uint8 zeros) and exa nf4 (block 64), through
  ``runtime.kernels.dispatch.quant_linear`` (autotuned before timing);
* bitsandbytes nf4 (``bnb.functional.quantize_4bit`` + ``bnb.matmul_4bit``) when importable;
* torch bf16 ``x @ W.T`` (cuBLAS).

Every timed kernel is first checked against the reference on that shape (``runtime.kernels
.reference``; bitsandbytes against its own ``dequantize_4bit``). Times are medians of CUDA-graph
replays (``triton.testing.do_bench_cudagraph``); each timed call cycles over enough copies of
the weights (>= 256 MB) that L2 (50 MB) cannot serve them. Bounds, measured in the same run:
HBM bandwidth from a large device-to-device copy (bytes read + written), and cuBLAS bf16 on the
same shape. Decode rows report weight GB/s as a fraction of HBM; prefill rows TFLOP/s as a
fraction of cuBLAS.

    python benchmarks/kernels.py --out kernels.json [--m 1,4,16,256,2048] [--shapes 4096x4096,...]
                                 [--formats exa-int4-g128,exa-nf4-b64] [--no-bnb]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.kernels import dispatch, reference as R  # noqa: E402
from runtime.kernels.common import packed_bytes  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]
M_VALUES = [1, 4, 16, 256, 2048]
SPECS = {"exa-int4-g128": QuantSpec("int", 4, 128, sym=False, zero_mode="int"),
         "exa-nf4-b64": QuantSpec("nf4", 4, 64)}
ROTATE_BYTES = 256 << 20


def bench(fn) -> float:
    """Median ms of ``fn`` from CUDA-graph replays (plain event timing if capture fails)."""
    import triton.testing as tt
    fn()
    torch.cuda.synchronize()
    try:
        return float(tt.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except Exception:  # noqa: BLE001 - e.g. a library call that cannot be captured
        torch.cuda.synchronize()
        return float(tt.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def hbm_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy (read + write bytes), median."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    import triton.testing as tt
    ms = tt.do_bench(lambda: b.copy_(a), warmup=50, rep=500, return_mode="median")
    del a, b
    return 2 * n / ms / 1e6


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def copies_for(nbytes: int) -> int:
    return max(1, math.ceil(ROTATE_BYTES / max(nbytes, 1)))


def run_shape(N: int, K: int, m_values, bnb, rows: list, gen, specs=SPECS) -> None:
    dev = "cuda"
    xs = {M: torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16) for M in m_values}
    # ---- torch bf16 (cuBLAS)
    w16 = [(torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(torch.bfloat16)
           for _ in range(copies_for(N * K * 2))]
    cublas_ms = {}
    for M, x in xs.items():
        ms = bench(lambda: [x @ w.T for w in w16]) / len(w16)
        cublas_ms[M] = ms
        rows.append(dict(N=N, K=K, M=M, impl="torch-bf16", ms=ms, bytes=N * K * 2, err=0.0))
    # ---- exa kernels
    for name, spec in specs.items():
        ts = [R.random_quantized(spec, N, K, device=dev, generator=gen)]
        nbytes = packed_bytes(ts[0])
        ts += [R.random_quantized(spec, N, K, device=dev, generator=gen)
               for _ in range(copies_for(nbytes) - 1)]
        w_ref = R.dequant(ts[0], spec, N, K, torch.float32)
        for M, x in xs.items():
            t0 = time.time()
            y = dispatch.quant_linear(x, ts[0], spec, N, K)          # tunes on first call
            tune_s = time.time() - t0
            err = rel_err(y, x.float() @ w_ref.T)
            ms = bench(lambda: [dispatch.quant_linear(x, t, spec, N, K) for t in ts]) / len(ts)
            rows.append(dict(N=N, K=K, M=M, impl=name, ms=ms, bytes=nbytes, err=err,
                             tune_s=round(tune_s, 2), config=_config(spec, N, K, M)))
        del ts, w_ref
    # ---- bitsandbytes nf4
    if bnb is not None:
        import bitsandbytes.functional as BF
        qs = [BF.quantize_4bit(w16[i % len(w16)], blocksize=64, quant_type="nf4",
                               compress_statistics=False) for i in range(copies_for(N * K // 2))]
        nbytes = qs[0][0].numel() + qs[0][1].absmax.numel() * 4
        w_deq = BF.dequantize_4bit(qs[0][0], qs[0][1]).float()
        for M, x in xs.items():
            y = bnb.matmul_4bit(x, qs[0][0].t(), quant_state=qs[0][1])
            err = rel_err(y, x.float() @ w_deq.T)
            ms = bench(lambda: [bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in qs]) / len(qs)
            rows.append(dict(N=N, K=K, M=M, impl="bnb-nf4", ms=ms, bytes=nbytes, err=err))
        del qs, w_deq
    del w16
    torch.cuda.empty_cache()


def _config(spec, N, K, M):
    from runtime.kernels import int_gemm, int_gemv, nf4_gemm, nf4_gemv
    from runtime.kernels.tuning import m_bucket
    mods = {("int", True): int_gemv, ("int", False): int_gemm, ("nf4", True): nf4_gemv,
            ("nf4", False): nf4_gemm}
    mod = mods[(spec.fmt, M <= dispatch.DECODE_MAX_M)]
    for key, cfg in mod.TUNER.cache.items():
        if key[0] == N and key[1] == K and key[2] == m_bucket(M):
            return cfg
    return None


def summarize(rows, hbm):
    cub = {(r["N"], r["K"], r["M"]): r["ms"] for r in rows if r["impl"] == "torch-bf16"}
    for r in rows:
        r["GBps"] = r["bytes"] / r["ms"] / 1e6
        r["frac_hbm"] = r["GBps"] / hbm
        r["TFLOPs"] = 2 * r["M"] * r["N"] * r["K"] / r["ms"] / 1e9
        r["frac_cublas"] = cub[(r["N"], r["K"], r["M"])] / r["ms"]


def table(rows) -> str:
    out = ["| N x K | M | impl | us | weight GB/s | % HBM | TFLOP/s | vs cuBLAS | rel err |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        decode = r["M"] <= 16
        out.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['impl']} | {r['ms'] * 1e3:.1f} | "
                   f"{r['GBps']:.0f} | {'**' if decode else ''}{100 * r['frac_hbm']:.0f}%"
                   f"{'**' if decode else ''} | {r['TFLOPs']:.1f} | "
                   f"{'' if decode else '**'}{100 * r['frac_cublas']:.0f}%{'' if decode else '**'} | "
                   f"{r['err']:.1e} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="kernels.json")
    ap.add_argument("--m", default=",".join(map(str, M_VALUES)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--no-bnb", action="store_true")
    ap.add_argument("--formats", default=",".join(SPECS), help="of " + ", ".join(SPECS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU")
        return 1
    m_values = [int(v) for v in args.m.split(",")]
    unknown = set(args.formats.split(",")) - set(SPECS)
    if unknown:
        ap.error(f"unknown --formats {sorted(unknown)}; known: {', '.join(SPECS)}")
    specs = {k: v for k, v in SPECS.items() if k in args.formats.split(",")}
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    bnb = None
    if not args.no_bnb:
        try:
            import bitsandbytes as bnb  # noqa: F811
        except Exception as e:  # noqa: BLE001
            print(f"bitsandbytes unavailable: {e}")
    import triton
    hbm = hbm_bandwidth()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
          f"{triton.__version__}  bnb {getattr(bnb, '__version__', None)}  HBM copy {hbm:.0f} GB/s",
          flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows: list = []
    t0 = time.time()
    for N, K in shapes:
        run_shape(N, K, m_values, bnb, rows, gen, specs)
        print(f"  {N}x{K} done at {time.time() - t0:.0f} s", flush=True)
    hbm_after = hbm_bandwidth()
    summarize(rows, hbm)
    from runtime.kernels import int_gemm, int_gemv, nf4_gemm, nf4_gemv
    tuning = {m.TUNER.name: [{"key": [str(k) for k in key], "timings_us": [
        {"config": c, "us": round(ms * 1e3, 2)} for c, ms in sorted(v, key=lambda r: r[1])]}
        for key, v in m.TUNER.timings.items()] for m in (int_gemv, int_gemm, nf4_gemv, nf4_gemm)}
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, bnb=getattr(bnb, "__version__", None),
                  hbm_copy_GBps=hbm, hbm_copy_GBps_after=hbm_after, date=time.strftime("%Y-%m-%d"),
                  command="python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                  rows=rows, tuning=tuning)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(rows))
    print(f"HBM copy bandwidth {hbm:.0f} GB/s (after: {hbm_after:.0f}); JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
