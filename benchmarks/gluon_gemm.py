"""Every config of the wgmma prefill kernel (runtime/kernels/int_gemm_gluon.py) beside the
tuned ``int_gemm`` (with EXA_GEMM_GLUON=0: the Triton kernel alone) and cuBLAS bf16 on the
unquantized weights, on one sm_90 GPU: microseconds (triton.testing.do_bench medians on one
weight matrix, so the 8B shapes may be served partly from L2; benchmarks/kernels.py cycles over
copies) and the fraction of cuBLAS. The wgmma kernel's times include its per-call copy of x into
its K order. Checks each config against the reference first.

    python3 benchmarks/gluon_gemm.py [--shapes 28672x8192,8192x28672] [--m 256,512,2048]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.kernels import int_gemm_gluon as W  # noqa: E402
from runtime.kernels.int_gemm import int_gemm  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


def main(args) -> None:
    import triton.testing as tt
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        t = intq.quantize(torch.randn(N, K, device="cuda") * 0.05, SPEC)
        wd = intq.dequantize(t, SPEC, N, K).bfloat16()
        for M in map(int, args.m.split(",")):
            x = torch.randn(M, K, device="cuda").bfloat16()
            ref = x.float() @ wd.float().T
            cub = tt.do_bench(lambda: x @ wd.T, warmup=25, rep=100) * 1e3
            exa = tt.do_bench(lambda: int_gemm(x, t, SPEC, N, K), warmup=25, rep=100) * 1e3
            line = [f"{N}x{K} M{M}: cuBLAS bf16 {cub:.1f}us | int_gemm {exa:.1f}us {cub / exa:.0%}"]
            for c in W.CONFIGS:
                if not W.valid(c, M, N, K, SPEC):
                    continue
                try:
                    y = W.launch(x, t, SPEC, N, K, c).float()
                except Exception as e:                   # noqa: BLE001 - report, go on
                    line.append(f"{c} FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                rel = float((y - ref).norm() / ref.norm())
                us = tt.do_bench(lambda: W.launch(x, t, SPEC, N, K, c), warmup=25, rep=100) * 1e3
                line.append(f"bn{c['BLOCK_N']}/bm{c['BLOCK_M']}/st{c['ST']}/sk{c['SPLIT_K']} {us:.1f}us {cub / us:.0%}"
                            + ("" if rel < 1e-2 else f" WRONG rel {rel:.2g}"))
            print(" | ".join(line), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336,8192x8192,28672x8192,8192x28672")
    ap.add_argument("--m", default="256,512,2048")
    main(ap.parse_args())
