"""Where the Gluon decode GEMV's time goes, one GPU, three measurements side by side:

* ``load``: a kernel that only reads the packed int4 words, in the GEMV's access pattern (each
  program: BLOCK_N rows, ``words`` int32 of every row a step, a 1/SPLIT_K slice of K) and
  xor-reduces them: the memory system's ceiling for that pattern;
* ``alu``: each Gluon config with every row reading row 0's words (stride 0: the weights come
  from L2), i.e. the dequant + mma + x traffic with (almost) no HBM traffic: the compute ceiling;
* ``real``: the same configs on the weights themselves (what the tuner times).

GB/s are of the packed weights + scales + zeros (``packed_bytes``) over CUDA-graph replays that
cycle over >= 256 MB of weight copies (``benchmarks/kernels.py``'s ``bench``), next to the HBM
copy bandwidth measured in the same run.

    python3 benchmarks/gemv_ceiling.py [--shapes 28672x8192,8192x28672] [--m 4,8,16] [--no-load]
        [--no-alu] [--configs 0,5,12] [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import bench, copies_for, hbm_bandwidth  # noqa: E402
from runtime.kernels import int_gemv_gluon as G  # noqa: E402
from runtime.kernels.common import packed_bytes  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


@triton.jit
def _read_words(qw_ptr, out_ptr, N, KW, BLOCK_N: tl.constexpr, WORDS: tl.constexpr,
                SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    span = KW // SPLIT_K
    ptrs = qw_ptr + rows[:, None] * KW + pid_k * span + tl.arange(0, WORDS)[None, :]
    acc = tl.zeros([BLOCK_N, WORDS], dtype=tl.int32)
    for k in range(0, span, WORDS):
        acc ^= tl.load(ptrs + k)
    tl.store(out_ptr + pid_k * N + rows, tl.xor_sum(acc, axis=1))


def load_ceiling(N, K, ts, rows):
    """GB/s of reading the packed words in the GEMV's pattern, over a few tilings."""
    out = torch.empty(4 * N, dtype=torch.int32, device="cuda")
    nbytes = N * K // 2
    for bn in (64, 128, 256):
        for words in (16, 32, 64):
            for sk in (1, 2, 4):
                for nw in (4, 8):
                    if (K // 8) % (sk * words):
                        continue
                    grid = (triton.cdiv(N, bn), sk)

                    def run():
                        for t in ts:
                            _read_words[grid](t["qweight"].view(torch.int32), out, N, K // 8,
                                              BLOCK_N=bn, WORDS=words, SPLIT_K=sk, num_warps=nw)
                    ms = bench(run) / len(ts)
                    rows.append(dict(kind="load", N=N, K=K, bn=bn, words=words, sk=sk, nw=nw,
                                     us=ms * 1e3, GBps=nbytes / ms / 1e6))


def _launch_alu(x, t, N, K, c, out):
    """One config with stride 0 over the weights (every row reads row 0's words)."""
    import triton as tr
    from runtime.kernels.splitk import partials, sum_partials
    sk = c["SPLIT_K"]
    dst = partials(out, sk)
    G._int4_gemv_gluon[(tr.cdiv(N, c["BLOCK_N"]), sk)](
        x, t["qweight"].view(torch.int32), t["scales"], t["zeros"], dst, out, dst, x.shape[0], N,
        K, K // 128, x.stride(0), dst.stride(-2), out.stride(0), 0, GROUP=128,
        BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], BLOCK_M=c["BLOCK_M"], SPLIT_K=sk,
        PF=c.get("PF", 0), ST=c.get("ST", 0), XS=bool(c.get("XS")), CH=c.get("CH", 1),
        FIXUP=False, EVICT="evict_first" if c.get("EVICT") else "", num_warps=c["num_warps"])
    sum_partials(dst, out)


def config_times(N, K, ts, m_values, configs, rows, alu=True):
    nbytes = packed_bytes(ts[0])
    ref_w = intq.dequantize(ts[0], SPEC, N, K)
    for M in m_values:
        x = torch.randn(M, K, device="cuda").bfloat16()
        ref = x.float() @ ref_w.T
        out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        for i, c in enumerate(configs):
            if c is None or not G.valid(c, M, N, K, SPEC):
                continue
            y = G.launch(x, ts[0], SPEC, N, K, c).float()
            rel = float((y - ref).norm() / ref.norm())
            real = bench(lambda: [G.launch(x, t, SPEC, N, K, c, out) for t in ts]) / len(ts)
            a = bench(lambda: [_launch_alu(x, t, N, K, c, out) for t in ts]) / len(ts) if alu else 0
            rows.append(dict(kind="config", N=N, K=K, M=M, i=i, config=c, rel=rel,
                             us=real * 1e3, alu_us=a * 1e3, GBps=nbytes / real / 1e6))
            print(f"{N}x{K} M{M} #{i} {c}: {real * 1e3:.1f} us ({nbytes / real / 1e6:.0f} GB/s), "
                  f"stride-0 {a * 1e3:.1f} us, rel {rel:.1e}", flush=True)


def main(args) -> None:
    hbm = hbm_bandwidth()
    print(f"HBM copy {hbm:.0f} GB/s", flush=True)
    rows = []
    configs = G.CONFIGS + [c for c in G.EXTRA if c["CH"] == 1 and c["ST"] <= 4]
    if args.configs:                         # indices into that list
        configs = [configs[int(i)] if str(i) in args.configs.split(",") else None
                   for i in range(len(configs))]
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        ts = []
        for _ in range(copies_for(N * K // 2)):
            ts.append(intq.quantize(torch.randn(N, K, device="cuda") * 0.05, SPEC))
        if not args.no_load:
            load_ceiling(N, K, ts, rows)
            best = max((r for r in rows if r["kind"] == "load" and r["N"] == N and r["K"] == K),
                       key=lambda r: r["GBps"])
            print(f"{N}x{K} load ceiling: best {best}", flush=True)
            for r in rows:
                if r["kind"] == "load" and r["N"] == N and r["K"] == K:
                    print(f"  load bn{r['bn']} words{r['words']} sk{r['sk']} nw{r['nw']}: "
                          f"{r['us']:.1f} us {r['GBps']:.0f} GB/s ({r['GBps'] / hbm:.0%})")
        config_times(N, K, ts, [int(m) for m in args.m.split(",")], configs, rows, not args.no_alu)
        del ts
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({"hbm_copy_GBps": hbm, "device":
                                              torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="28672x8192,8192x28672")
    ap.add_argument("--m", default="4,8,16")
    ap.add_argument("--no-load", action="store_true", help="skip the load-pattern ceiling")
    ap.add_argument("--no-alu", action="store_true", help="skip the stride-0 timings")
    ap.add_argument("--configs", help="comma-separated indices into the config list (default: all)")
    ap.add_argument("--out")
    main(ap.parse_args())
