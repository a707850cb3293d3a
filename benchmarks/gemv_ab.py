"""Two versions of the Gluon decode GEMV (runtime/kernels/int_gemv_gluon.py and another copy of
that file, e.g. the last commit's) timed side by side on one GPU: the same weights, x and
configs, each config's two timings taken one after the other, so a change to the kernel is
measured against its own baseline in the same run.

    git show HEAD:runtime/kernels/int_gemv_gluon.py > /tmp/old_gemv_gluon.py
    python3 benchmarks/gemv_ab.py --old /tmp/old_gemv_gluon.py [--shapes 28672x8192,8192x28672]
        [--m 4,8,16] [--configs 3,5,7] [--out F.json]
    python3 benchmarks/gemv_ab.py --vary XS=False --configs 49,50     # one flag, same file
    python3 benchmarks/gemv_ab.py --wgmma --vary ZP=0 --configs 8,9     # the wgmma kernel's
    python3 benchmarks/gemv_ab.py --tma --m 16          # the TMA warp-specialized one's CONFIGS

``--configs``: indices into this file's ``CONFIGS + EXTRA`` (``--wgmma``: into
``int_gemm_gluon``'s ``DECODE + DECODE_X``, the wgmma kernel as a GEMV, with the time of its
per-call copy of x into its K order printed alone too); a config the other file's list
does not hold at the same index is timed in this version only. ``--vary KEY=VALUE,...``: the
"old" side runs each config with those keys changed (``--old`` defaults to this file), so
one config flag is measured against its own baseline. GB/s are of the packed
weights + scales + zeros (``packed_bytes``) over CUDA-graph replays cycling over >= 256 MB of
weight copies (``benchmarks/kernels.py``'s ``bench``), next to the HBM copy bandwidth
measured in the same run.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels import bench, copies_for, hbm_bandwidth  # noqa: E402
from runtime.kernels import int_gemm_gluon as WG  # noqa: E402
from runtime.kernels import int_gemv_gluon as GV  # noqa: E402
from runtime.kernels import int_gemv_tma as TM  # noqa: E402
from runtime.kernels.common import packed_bytes  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("int_gemv_gluon_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def configs(mod) -> list[dict]:
    """The indexable config list of the GEMV module, (``WG``) of the wgmma kernel's decode, or
    (``TM``) of the TMA-ring kernel."""
    if mod is TM:
        return mod.CONFIGS
    return mod.DECODE + mod.DECODE_X if mod is WG else mod.CONFIGS + mod.EXTRA


def main(args) -> int:
    NEW = TM if args.tma else WG if args.wgmma else GV
    old = load_old(args.old) if args.old else NEW
    vary = {k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in args.vary.split(","))} \
        if args.vary else {}
    hbm = hbm_bandwidth()
    print(f"{torch.cuda.get_device_name()}: HBM copy {hbm:.0f} GB/s", flush=True)
    new_cfgs, old_cfgs = configs(NEW), configs(old)
    idx = [int(i) for i in args.configs.split(",")] if args.configs else range(len(new_cfgs))
    rows = []
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        ts = [intq.quantize(torch.randn(N, K, device="cuda") * 0.05, SPEC)
              for _ in range(copies_for(N * K // 2))]
        nbytes = packed_bytes(ts[0])
        ref_w = intq.dequantize(ts[0], SPEC, N, K)
        for M in (int(m) for m in args.m.split(",")):
            x = torch.randn(M, K, device="cuda").bfloat16()
            ref = x.float() @ ref_w.T
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            if args.wgmma or args.tma:
                us = bench(lambda: WG.permute_x(x)) * 1e3
                print(f"{N}x{K} M{M}: x into the wgmma K order alone {us:.1f} us", flush=True)
            for i in idx:
                c = new_cfgs[i]
                if not NEW.valid(c, M, N, K, SPEC) or ((args.wgmma or args.tma)
                                                       and c["BLOCK_M"] < M):
                    continue
                oc = {**c, **vary}
                both = (old.valid(oc, M, N, K, SPEC) if vary else
                        i < len(old_cfgs) and old_cfgs[i] == c)   # else: a config new here
                r = dict(N=N, K=K, M=M, i=i, config=c, bytes=nbytes, old_config=oc)
                sides = (("old", old, oc), ("new", NEW, c)) if both else (("new", NEW, c),)
                for name, mod, cc in sides:
                    y = mod.launch(x, ts[0], SPEC, N, K, cc).float()
                    r[f"{name}_rel"] = float((y - ref).norm() / ref.norm())
                    ms = bench(lambda: [mod.launch(x, t, SPEC, N, K, cc, out)
                                        for t in ts]) / len(ts)
                    r[f"{name}_us"] = ms * 1e3
                rows.append(r)
                was = (f"old {r['old_us']:.1f} us ({nbytes / r['old_us'] / 1e3 / hbm:.0%}) "
                       if both else "(new config) ")
                print(f"{N}x{K} M{M} #{i} {c}: {was}new {r['new_us']:.1f} us "
                      f"({nbytes / r['new_us'] / 1e3 / hbm:.0%})"
                      + (f" x{r['old_us'] / r['new_us']:.2f}" if both else "")
                      + f", rel {r['new_rel']:.1e}", flush=True)
        ts = None
        torch.cuda.empty_cache()
    for shape in args.shapes.split(","):
        N, K = map(int, shape.split("x"))
        for M in (int(m) for m in args.m.split(",")):
            rs = [r for r in rows if (r["N"], r["K"], r["M"]) == (N, K, M)]
            if rs:
                bo = min((r for r in rs if "old_us" in r), key=lambda r: r["old_us"],
                         default=None)
                bn = min(rs, key=lambda r: r["new_us"])
                print(f"best {N}x{K} M{M}: "
                      + (f"old #{bo['i']} {bo['old_us']:.1f} us, " if bo else "")
                      + f"new #{bn['i']} {bn['new_us']:.1f} us "
                      f"({bn['bytes'] / bn['new_us'] / 1e3 / hbm:.0%} of HBM)")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "hbm_copy_GBps": hbm, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", help="path of the other int_gemv_gluon.py (default: this one)")
    ap.add_argument("--vary", help="KEY=VALUE,...: the old side's change to each config")
    ap.add_argument("--shapes", default="28672x8192,8192x28672")
    ap.add_argument("--m", default="4,8,16")
    ap.add_argument("--configs", help="comma-separated indices into CONFIGS + EXTRA (default: all)")
    ap.add_argument("--wgmma", action="store_true",
                    help="time int_gemm_gluon's decode configs (DECODE + DECODE_X) instead")
    ap.add_argument("--tma", action="store_true",
                    help="time int_gemv_tma's CONFIGS (TMA ring, warp-specialized) instead")
    ap.add_argument("--out")
    sys.exit(main(ap.parse_args()))
