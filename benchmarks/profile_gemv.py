"""One decode GEMV launch to put under a profiler (Nsight Compute), after a warm-up.

    ncu --kernel-name regex:_int_gemv --launch-skip 3 --launch-count 1 --section WarpStateStats \
        python3 benchmarks/profile_gemv.py --shape 28672x8192 --m 16 [--simt | --gluon I | --wgmma I]

Random int4 g128 weights (uint8 zero points); the tensor-core config the tuner offers first
(BLOCK_N 64, BLOCK_K 256), or with ``--simt`` the first CUDA-core config of the M bucket, forced
through the tuner's override so no tuning launches are profiled. Prints the config and the
relative error against the reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.kernels import int_gemv, reference as R  # noqa: E402
from runtime.kernels.tuning import m_bucket  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="28672x8192")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--simt", action="store_true")
    ap.add_argument("--gluon", type=int, metavar="I",
                    help="profile config I of int_gemv_gluon.CONFIGS instead (kernel _int4_gemv_gluon)")
    ap.add_argument("--wgmma", type=int, metavar="I",
                    help="profile int_gemm_gluon's decode config I of DECODE + DECODE_X instead "
                         "(kernel _int4_gemm_wgmma, launched directly)")
    ap.add_argument("--launches", type=int, default=5)
    args = ap.parse_args()
    N, K = map(int, args.shape.split("x"))
    spec = QuantSpec("int", 4, 128, zero_mode="int")
    g = torch.Generator(device="cuda").manual_seed(0)
    t = R.random_quantized(spec, N, K, device="cuda", generator=g)
    x = torch.randn(args.m, K, device="cuda", generator=g).to(torch.bfloat16)
    if args.wgmma is not None:
        from runtime.kernels import int_gemm_gluon as W
        c = (W.DECODE + W.DECODE_X)[args.wgmma]
        for _ in range(args.launches):
            y = W.launch(x, t, spec, N, K, c)
        torch.cuda.synchronize()
        ref = x.float() @ R.dequant(t, spec, N, K, torch.float32).T
        print(c, "rel err", float((y.float() - ref).norm() / ref.norm()))
        return 0
    cands = int_gemv.candidates(m_bucket(args.m), 4)
    if args.gluon is not None:
        from runtime.kernels import int_gemv_gluon as G
        cands = [{**G.CONFIGS[args.gluon], "GLUON": True}]
        args.simt = False
    cfg = next(c for c in cands if bool(c.get("SIMT")) == args.simt and not c.get("PLANES")
               and int_gemv._valid(c, m_bucket(args.m), N, K, 4, 128, spec))
    int_gemv.TUNER.override, int_gemv.TUNER.cache = [cfg], {}
    for _ in range(args.launches):
        y = int_gemv.int_gemv(x, t, spec, N, K)
    torch.cuda.synchronize()
    ref = x.float() @ R.dequant(t, spec, N, K, torch.float32).T
    print(cfg, "rel err", float((y.float() - ref).norm() / ref.norm()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
