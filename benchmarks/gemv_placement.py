"""One decode shape's two M = 16 kernels, the Gluon GEMV's pick (int_gemv_gluon CONFIGS[21]) and
the first wgmma decode config (int_gemm_gluon DECODE[0]), timed on different weight tensors of
the same shape, with and without a preallocated output, then through ``dispatch.quant_linear``
with the tuner's pick forced to each: how much a timing depends on where the weights lie and on
the harness. Weights: ``reference.random_quantized`` (what kernels.py times) and
``intq.quantize`` of random normals (what gemv_ab.py times), three copies each, cycled as
kernels.py does.

    EXA_CACHE_DIR=$(mktemp -d) python3 benchmarks/gemv_placement.py [--shape 28672x8192]
        [--wgmma-config '{"RK": True}']
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import bench, hbm_bandwidth  # noqa: E402
from runtime.kernels import dispatch, int_gemv  # noqa: E402
from runtime.kernels import int_gemm_gluon as W, int_gemv_gluon as G, reference as R  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, sym=False, zero_mode="int")


def main(args) -> int:
    N, K = map(int, args.shape.split("x"))
    M = 16
    print(torch.cuda.get_device_name(), "HBM", round(hbm_bandwidth()))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=gen).bfloat16()
    weights = {"random": [R.random_quantized(SPEC, N, K, device="cuda", generator=gen)
                          for _ in range(3)],
               "quantize": [intq.quantize(torch.randn(N, K, device="cuda") * 0.05, SPEC)
                            for _ in range(3)]}
    cw = {**W.DECODE[0], **ast.literal_eval(args.wgmma_config)}
    cg = G.CONFIGS[21]
    out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    for rep in range(2):
        for wname, ts in weights.items():
            for cname, mod, c in (("wgmma", W, cw), ("gemv", G, cg)):
                a = bench(lambda: [mod.launch(x, t, SPEC, N, K, c, out) for t in ts]) / 3 * 1e3
                b = bench(lambda: [mod.launch(x, t, SPEC, N, K, c) for t in ts]) / 3 * 1e3
                print(f"rep{rep} {wname:8s} {cname}: launch(out) {a:.1f} us, launch() {b:.1f} us",
                      flush=True)
    tr = weights["random"]
    for cname, c in (("wgmma", {**cw, "WGMMA": True}), ("gemv", {**cg, "GLUON": True})):
        dispatch.quant_linear(x, tr[0], SPEC, N, K)            # tunes once (fresh cache)
        keys = [k for k in int_gemv.TUNER.cache if k[0] == N and k[1] == K]
        for k in keys:
            int_gemv.TUNER.cache[k] = c
        d = bench(lambda: [dispatch.quant_linear(x, t, SPEC, N, K) for t in tr]) / 3 * 1e3
        print(f"dispatch {cname}: {d:.1f} us  (keys {keys})", flush=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--wgmma-config", default="{}", help="keys added to DECODE[0]")
    sys.exit(main(ap.parse_args()))
