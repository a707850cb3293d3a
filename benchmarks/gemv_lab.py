"""Decode-GEMV lab: every CUDA-core (SIMT) config of the int4 g128 GEMV, timed against HBM.

For each Llama layer shape (70B first, then 8B) at M = 1 (``--m 1,2,4,8`` adds those), in one run:

* random int4 weights, group 128, uint8 zero points (the GPTQ grid, the kernels' MODE 1),
  quantized from random float weights by ``runtime.quant.intq`` (RTN) and copied until the
  copies exceed ``benchmarks/kernels.py``'s ROTATE_BYTES (256 MB; L2 is 50 MB);
* every SIMT candidate of the M bucket (``int_gemv_simt.simt_candidates``) plus a few lab-only
  variants (``LAB_EXTRA``), each checked against the torch reference on that shape (relative
  error; above 1e-2 it is flagged and left out of the ranking), then timed as the op runs it
  (``int_gemv.launch``: kernel + split-K sum) and, for split-K configs on two shapes
  (KERNEL_ONLY), the kernel alone (what a fused split-K sum could save);
* the tuned choice of ``runtime.kernels.dispatch.quant_linear`` (fresh tuning cache unless
  ``--keep-cache``; every int_gemv candidate, tensor-core ones included, is timed by the
  autotuner, and its timings go to the JSON), and cuBLAS bf16 ``x @ W.T`` on the same shape;
* with ``--baseline REV``, the SIMT kernel of git revision REV (its own candidates), if git
  and the revision are there.

Times are medians of CUDA-graph replays over all the copies (benchmarks/kernels.py's method);
HBM bandwidth is measured in the same run (2 GiB device copy, before and after). Packed GB/s
counts qweight + scales + zeros. A deadline (``--budget-s``) skips what is left past it.

    python3 benchmarks/gemv_lab.py --out gemv_lab.json [--m 1,4] [--shapes 28672x8192,...]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = [(28672, 8192), (8192, 28672), (8192, 8192), (10240, 8192),
          (4096, 4096), (14336, 4096), (4096, 14336)]
ERR_MAX = 1e-2
DEVICE = "cuda"
KERNEL_ONLY = {(28672, 8192), (4096, 4096)}   # split-K configs also timed without their sum
# lab-only SIMT variants (not autotuner candidates): keys the tuner list samples sparsely; XJOIN
# ones at M = 1, and the best pre-XJOIN configs of M = 2 / 4 for comparison
LAB_EXTRA = {
    1: [dict(bn=64, bk=256, sk=2, ns=3), dict(bn=64, bk=256, sk=2, evict=False),
        dict(bn=128, bk=512, sk=1, nw=8),
        dict(bn=128, bk=256, sk=1, pf=1), dict(bn=64, bk=256, sk=4, persist=4),
        dict(bn=64, bk=256, sk=2, pf=1, offset=False), dict(bn=32, bk=256, sk=8, pf=1),
        dict(bn=64, bk=256, sk=2, join=1), dict(bn=128, bk=256, sk=1, join=1)],
    2: [dict(bn=128, bk=128, sk=1), dict(bn=256, bk=256, sk=1, join=1),
        dict(bn=128, bk=256, sk=2, ns=3, join=1), dict(bn=128, bk=128, sk=4, nw=2, join=1)],
    4: [dict(bn=128, bk=128, sk=1, nw=8), dict(bn=64, bk=64, sk=2),
        dict(bn=128, bk=256, sk=2, ns=3, join=1), dict(bn=128, bk=64, sk=8, nw=1, join=1),
        dict(bn=128, bk=256, sk=4, pf=1, join=1)],
    8: [dict(bn=128, bk=128, sk=1, nw=2, join=1), dict(bn=128, bk=128, sk=4, nw=2, join=1),
        dict(bn=64, bk=128, sk=4, nw=2, join=1)],
}


def log(msg: str) -> None:
    print(msg, flush=True)


def bench(fn, rep: int) -> float:
    """Median ms of ``fn`` over CUDA-graph replays (plain event timing if capture fails)."""
    import triton.testing as tt
    fn()
    torch.cuda.synchronize()
    try:
        return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    except Exception:  # noqa: BLE001 - capture failed: time eagerly
        torch.cuda.synchronize()
        return float(tt.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def load_baseline(rev: str):
    """The SIMT kernel module of git revision ``rev``, or None (with the reason printed)."""
    try:
        if Path(rev).is_file():                      # a saved copy of the old module
            src = Path(rev).read_text()
        else:
            src = subprocess.run(["git", "-C", str(ROOT), "show",
                                  f"{rev}:runtime/kernels/int_gemv_simt.py"],
                                 capture_output=True, text=True, check=True, timeout=30).stdout
    except Exception as e:  # noqa: BLE001 - no git, no such revision
        log(f"baseline {rev}: not available ({type(e).__name__}); skipped")
        return None
    path = Path(tempfile.mkdtemp()) / "int_gemv_simt_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("int_gemv_simt_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def baseline_launch(mod, x, t, spec, N, K, cfg, out):
    """int_gemv.launch for another module's simt_launch (split-K sum in the same fixed order)."""
    from runtime.kernels.common import group_of, mode_of
    mode, sk = mode_of(spec), cfg["SPLIT_K"]
    zt = t["scales"] if mode == 0 else t["zeros" if mode == 1 else "mins"]
    dst = out if sk == 1 else torch.empty(sk, x.shape[0], N, device=x.device, dtype=torch.float32)
    mod.simt_launch(x, t["qweight"].view(torch.int32), t["scales"], zt, dst, N, K,
                    group_of(spec, K), mode, spec.bits, cfg)
    if sk != 1:
        out.copy_(dst.sum(0))
    return out


def run_shape(N, K, M, args, kb, hbm, deadline, result) -> None:
    from runtime.kernels import dispatch, int_gemv, int_gemv_simt as S, reference as R
    from runtime.kernels.tuning import m_bucket
    from runtime.quant import intq
    from runtime.quant.spec import QuantSpec
    spec = QuantSpec("int", 4, 128, sym=False, zero_mode="int")
    dev, mb = DEVICE, m_bucket(M)
    gen = torch.Generator(device=dev).manual_seed(N * 7 + K + M)
    t0 = intq.quantize(torch.randn(N, K, device=dev, generator=gen), spec)
    t0 = {k: v.contiguous() for k, v in t0.items()}
    nbytes = kb.packed_bytes(t0)
    ts = [t0] + [{k: v.clone() for k, v in t0.items()} for _ in range(kb.copies_for(nbytes) - 1)]
    x = torch.randn(M, K, device=dev, generator=gen).to(torch.bfloat16)
    ref = x.float() @ R.dequant(t0, spec, N, K, torch.float32).T
    out = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    row = dict(N=N, K=K, M=M, packed_bytes=nbytes, copies=len(ts), configs=[], flagged=[])

    def gbps(ms):
        return dict(us=round(ms * 1e3, 2), GBps=round(nbytes / ms / 1e6, 1),
                    frac_hbm=round(nbytes / ms / 1e6 / hbm, 4))

    cands = [("simt", c) for c in S.simt_candidates(mb, 4)]
    cands += [("lab", S.simt_cfg(bm=mb, **e)) for e in LAB_EXTRA.get(mb, [])]
    base = args.baseline_mod
    if base is not None:
        cands += [("baseline", c) for c in base.simt_candidates(mb, 4)]
    for source, cfg in cands:
        if time.time() > deadline:
            row["skipped"] = "deadline"
            break
        mod = base if source == "baseline" else S
        if not mod.simt_valid(cfg, mb, K, 4, 128):
            continue
        if source == "baseline":
            run = (lambda t, c=cfg: baseline_launch(base, x, t, spec, N, K, c, out))
        else:
            run = (lambda t, c=cfg: int_gemv.launch(x, t, spec, N, K, c, out))
        entry = dict(source=source, config=cfg)
        try:
            entry["err"] = kb.rel_err(run(t0).clone(), ref)
        except Exception as e:  # noqa: BLE001 - a config that does not build here
            entry.update(err=float("inf"), error=f"{type(e).__name__}: {str(e)[:200]}")
        if not entry["err"] <= ERR_MAX:
            row["flagged"].append(entry)
            log(f"    FLAGGED {source} {cfg}: err {entry['err']:.2e} {entry.get('error', '')}")
            continue
        try:
            entry.update(gbps(bench(lambda r=run: [r(t) for t in ts], args.rep) / len(ts)))
        except Exception as e:  # noqa: BLE001 - e.g. a launch that cannot be captured
            entry.update(err=float("inf"), error=f"{type(e).__name__}: {str(e)[:200]}")
            row["flagged"].append(entry)
            continue
        if cfg["SPLIT_K"] > 1 and source != "baseline" and (N, K) in KERNEL_ONLY:
            dst = torch.empty(cfg["SPLIT_K"], M, N, device=dev, dtype=torch.float32)

            def kern(t, c=cfg, dst=dst):
                return S.simt_launch(x, t["qweight"].view(torch.int32), t["scales"], t["zeros"],
                                     dst, N, K, 128, 1, 4, c)
            entry["kernel_us"] = round(bench(lambda k=kern: [k(t) for t in ts], args.rep)
                                       / len(ts) * 1e3, 2)
        row["configs"].append(entry)
    row["configs"].sort(key=lambda e: e["us"])
    # the autotuned choice of the dispatcher (every int_gemv candidate timed on first call)
    ttune = time.time()
    y = dispatch.quant_linear(x, t0, spec, N, K)
    key = next((k for k in int_gemv.TUNER.cache if k[:3] == (N, K, mb)), None)
    if y is None:                             # no kernel built (dispatch warned why)
        row["dispatch"] = dict(config=None, err=float("inf"), us=float("nan"))
    else:
        ms = bench(lambda: [dispatch.quant_linear(x, t, spec, N, K) for t in ts], args.rep)
        row["dispatch"] = dict(config=int_gemv.TUNER.cache.get(key), err=kb.rel_err(y, ref),
                               tune_s=round(time.time() - ttune, 2), **gbps(ms / len(ts)))
    timed = sorted(int_gemv.TUNER.timings.get(key, []), key=lambda r: r[1])
    row["tuner_timings_us"] = [dict(config=c, us=round(v * 1e3, 2)) for c, v in timed]
    tc = [r for r in row["tuner_timings_us"] if not r["config"].get("SIMT")]
    row["tensor_core_best_tuner_us"] = tc[0] if tc else None
    ts.clear()
    torch.cuda.empty_cache()
    # cuBLAS bf16 on the same shape
    w16 = [(torch.randn(N, K, device=dev, generator=gen) * K ** -0.5).to(torch.bfloat16)
           for _ in range(kb.copies_for(N * K * 2))]
    ms = bench(lambda: [x @ w.T for w in w16], args.rep) / len(w16)
    row["cublas_bf16"] = dict(us=round(ms * 1e3, 2), GBps=round(N * K * 2 / ms / 1e6, 1))
    w16.clear()
    torch.cuda.empty_cache()
    result["shapes"].append(row)
    tc = row["tensor_core_best_tuner_us"]
    log(f"  {N}x{K} M={M}: {len(row['configs'])} configs timed, {len(row['flagged'])} flagged; "
        f"cuBLAS bf16 {row['cublas_bf16']['us']} us; dispatch {row['dispatch']['us']} us "
        f"({'SIMT' if (row['dispatch']['config'] or {}).get('SIMT') else 'tensor cores'}); "
        f"best tensor-core config in the tuner {tc['us'] if tc else '-'} us")
    for e in row["configs"][:5]:
        extra = f" (kernel {e['kernel_us']} us)" if "kernel_us" in e else ""
        log(f"    {e['us']:8.2f} us {e['GBps']:7.0f} GB/s {100 * e['frac_hbm']:5.1f}% HBM  "
            f"err {e['err']:.1e} {e['source']:8s} {_short(e['config'])}{extra}")


def _short(cfg: dict) -> str:
    keys = ("BLOCK_N", "BLOCK_K", "BLOCK_M", "SPLIT_K", "num_warps", "num_stages", "VEC", "OFFSET",
            "EVICT", "PERSIST", "PREFETCH")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gemv_lab.json", help="JSON with every timing")
    ap.add_argument("--m", default="1", help="comma-separated M values (1..8), default 1")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--rep", type=int, default=25, help="ms of graph replays per timing")
    ap.add_argument("--budget-s", type=float, default=205.0, help="skip what is left after this")
    ap.add_argument("--baseline", default=None, help="git revision (or a file) whose SIMT kernel to time too")
    ap.add_argument("--keep-cache", action="store_true", help="use the on-disk tuning cache")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gemv_lab.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing was run", file=sys.stderr)
        return 2
    t_start = time.time()
    deadline = t_start + args.budget_s
    if not args.keep_cache:
        os.environ["EXA_CACHE_DIR"] = tempfile.mkdtemp(prefix="exa-gemv-lab-")
    import triton
    import kernels as kb                      # benchmarks/kernels.py: bench helpers, HBM probe
    args.baseline_mod = load_baseline(args.baseline) if args.baseline else None
    hbm = kb.hbm_bandwidth()
    log(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton "
        f"{triton.__version__}  HBM copy {hbm:.0f} GB/s  ROTATE {kb.ROTATE_BYTES >> 20} MB")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, hbm_copy_GBps=hbm, date=time.strftime("%Y-%m-%d"),
                  command="python3 " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
                  err_max=ERR_MAX, shapes=[], skipped=[])
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for M in [int(v) for v in args.m.split(",")]:
        for N, K in shapes:
            if time.time() > deadline:
                result["skipped"].append(f"{N}x{K} M={M}")
                log(f"  {N}x{K} M={M}: skipped (past --budget-s)")
                continue
            log(f"{N}x{K} M={M} (at {time.time() - t_start:.0f} s)")
            run_shape(N, K, M, args, kb, hbm, deadline, result)
    result["hbm_copy_GBps_after"] = kb.hbm_bandwidth()
    result["wall_s"] = round(time.time() - t_start, 1)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    log(f"HBM {hbm:.0f} GB/s (after: {result['hbm_copy_GBps_after']:.0f}); "
        f"{result['wall_s']} s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
