"""First timing of the Gluon int4 GEMV prototype (runtime/kernels/int_gemv_gluon.py) beside the
tuned ``int_gemv`` on one GPU: microseconds (triton.testing.do_bench medians, L2 not flushed:
for a first look only; benchmarks/kernels.py is the careful measurement) and the packed
weights' GB/s. Checks each config against the reference first.

    python3 benchmarks/gluon_gemv.py [--shapes 4096x4096,28672x4096,4096x14336] [--m 1,8,16] [--extra]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.kernels import int_gemv_gluon as G  # noqa: E402
from runtime.kernels.int_gemv import int_gemv  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


def main(args) -> None:
    import triton.testing as tt
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        w = torch.randn(N, K, device="cuda") * 0.05
        t = intq.quantize(w, SPEC)
        ref_w = intq.dequantize(t, SPEC, N, K)
        for M in map(int, args.m.split(",")):
            x = torch.randn(M, K, device="cuda").bfloat16()
            ref = x.float() @ ref_w.T
            nbytes = N * K // 2 + N * (K // 128) * 3
            base = tt.do_bench(lambda: int_gemv(x, t, SPEC, N, K), warmup=25, rep=100) * 1e3
            line = [f"{N}x{K} M{M}: int_gemv {base:.1f}us {nbytes / base / 1e3:.0f}GB/s"]
            best = (base, "int_gemv")
            for i, c in enumerate(G.CONFIGS + (G.EXTRA if args.extra else [])):
                if not G.valid(c, M, N, K, SPEC):
                    continue
                y = G.launch(x, t, SPEC, N, K, c).float()
                rel = float((y - ref).norm() / ref.norm())
                us = tt.do_bench(lambda: G.launch(x, t, SPEC, N, K, c), warmup=25, rep=100) * 1e3
                name = (f"#{i} {c['BLOCK_N']}/{c['BLOCK_K']}/sk{c['SPLIT_K']}/w{c['num_warps']}"
                        f"/bm{c['BLOCK_M']}/pf{c['PF']}/st{c['ST']}{'/xs' if c['XS'] else ''}")
                line.append(f"{name} {us:.1f}us {nbytes / us / 1e3:.0f}GB/s"
                            + ("" if rel < 1e-2 else f" WRONG rel {rel:.2g}"))
                if rel < 1e-2 and us < best[0]:
                    best = (us, name)
            line.insert(1, f"BEST {best[1]} {best[0]:.1f}us {nbytes / best[0] / 1e3:.0f}GB/s")
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,28672x4096,4096x14336,28672x8192,8192x28672")
    ap.add_argument("--m", default="1,8,16")
    ap.add_argument("--extra", action="store_true", help="also time int_gemv_gluon.EXTRA")
    main(ap.parse_args())
