"""Compile the Gluon int4 GEMV prototype (runtime/kernels/int_gemv_gluon.py) offline for sm_90 and
report what its compiled code does with shared memory: no GPU (and no torch) needed. With
``--gemm``: the wgmma prefill prototype (runtime/kernels/int_gemm_gluon.py) instead; with
``--tma``: the TMA-ring decode GEMV (runtime/kernels/int_gemv_tma.py).

    /tmp/t36/bin/python benchmarks/gluon_offline.py [--torch-site DIR] [--dump DIR] [--gemm | --tma]

(/tmp/t36: a venv with triton 3.6, the device's version.) For each config: ``shared`` bytes
(metadata), registers and SHARED from ``cuobjdump --dump-resource-usage``, PTX counts of
st.shared / ld.shared / ldmatrix / mma / global loads, SASS opcode counts (STS, LDS, LDSM, HMMA,
LDG, PRMT, LDL / STL: spills) from the bundled ``nvdisasm``, and TTGIR counts of local_alloc /
convert_layout.
With ``--torch-site`` (a site-packages holding torch, appended after triton 3.6 on sys.path)
the existing ``_int_gemv_kernel`` of int_gemv.py is compiled the same way for comparison.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
DIV16 = [["tt.divisibility", 16]]
ARGS = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "out_ptr", "M", "N", "K", "G", "stride_xm",
        "stride_om", "stride_qw"]
ALIGNED = ("x_ptr", "qw_ptr", "s_ptr", "z_ptr", "out_ptr", "K", "stride_xm", "stride_om",
           "stride_qw")                        # what the JIT specializes at a real launch


GEMM_ARGS = ARGS[:5] + ["fin_ptr", "cnt_ptr"] + ARGS[5:11] + ["stride_fin", "stride_qw"]


def _sig(dt: str, consts: dict, gluon: bool = True, names=None) -> tuple[dict, dict]:
    """The Gluon kernels' signature (both: GEMM_ARGS; ``names``: another kernel's, e.g. the
    stream-K GEMV's SK_ARGS), or (not ``gluon``) int_gemv.py's Triton kernel's: ``out_ptr`` is
    the float32 workspace when K is split (FIXUP), ``fin_ptr`` the output."""
    names = names or (GEMM_ARGS if gluon else ARGS)
    split = bool(consts.get("FIXUP"))
    types = {"x_ptr": "*" + dt, "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
             "out_ptr": "*fp32" if split else "*" + dt, "fin_ptr": "*" + dt, "cnt_ptr": "*i32",
             "ws_ptr": "*fp32"}
    sig = {a: types.get(a, "i32") for a in names}
    sig.update({k: "constexpr" for k in consts})
    attrs = {(names.index(a),): DIV16
             for a in ALIGNED + ("fin_ptr", "cnt_ptr", "stride_fin", "ws_ptr") if a in names}
    return sig, attrs


def sass_counts(cubin: bytes) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        res = subprocess.run([str(BIN / "cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), "-c", path], capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(path)
    ops = Counter(m.group(1).split(".")[0] for m in
                  re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    out = {k: ops.get(k, 0) for k in ("STS", "LDS", "LDSM", "HMMA", "LDG", "PRMT", "HADD2", "LOP3",
                                      "LDL", "STL")}          # LDL / STL: spilled registers
    out["LDGSTS"] = ops.get("LDGSTS", 0)                # cp.async: all 16-byte (.128) wanted
    out["LDGSTS<16B"] = len(re.findall(r"LDGSTS(?!\.E\.BYPASS\.128)", sass))
    reg = re.search(r"REG:(\d+)", res)
    shm = re.search(r"SHARED:(\d+)", res)
    out["REG"] = int(reg.group(1)) if reg else None
    out["SHARED"] = int(shm.group(1)) if shm else None
    loc = re.search(r"LOCAL:(\d+)", res)
    out["LOCAL"] = int(loc.group(1)) if loc else None      # > 0: registers spilled
    return out, sass


def report(name: str, c, dump: Path | None) -> dict:
    ptx, ttgir = c.asm["ptx"], c.asm["ttgir"]
    row = {"shared": c.metadata.shared,
           "st.shared": len(re.findall(r"\bst\.shared", ptx)),
           "ld.shared": len(re.findall(r"\bld\.shared", ptx)),
           "ldmatrix": len(re.findall(r"\bldmatrix", ptx)),
           "mma": len(re.findall(r"\bmma\.sync", ptx)),
           "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
           "ld.global.v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx)),
           "ld.global": len(re.findall(r"\bld\.global", ptx)),
           "evict_first": len(re.findall(r"evict_first", ptx)),
           "local_alloc": ttgir.count("ttg.local_alloc"),
           "convert_layout": ttgir.count("ttg.convert_layout")}
    if "cubin" in c.asm:
        sc, sass = sass_counts(c.asm["cubin"])
        row.update(sc)
    else:
        sass = ""
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        for ext, text in (("ttgir", ttgir), ("ptx", ptx), ("sass", sass)):
            (dump / f"{name}.{ext}").write_text(text)
    return row


def compile_gluon(kernel, c: dict, dt: str):
    """Compile the Gluon ``kernel`` for one config dict ``c`` (constexprs + num_warps); split K
    with the in-kernel fixup, as ``launch`` runs it."""
    from triton.experimental.gluon._runtime import GluonASTSource
    consts = {"GROUP": 128, **{k: v for k, v in c.items() if k != "num_warps"}}
    consts["FIXUP"] = c["SPLIT_K"] > 1
    if "EVICT" in consts:
        consts["EVICT"] = "evict_first" if consts["EVICT"] else ""
    sig, attrs = _sig(dt, consts)
    src = GluonASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": c["num_warps"]})


def gemm_report(dump) -> bool:
    """The wgmma prefill prototype (int_gemm_gluon.py): compiles, uses wgmma, and no shared
    memory store moves the dequantized tile (only cp.async fills the rings)."""
    from runtime.kernels import int_gemm_gluon as W
    ok = True
    for c in W.CONFIGS + W.DECODE + W.DECODE_X:
        for dt in ("bf16", "fp16"):
            name = (f"gemm_bn{c['BLOCK_N']}_bm{c['BLOCK_M']}_st{c['ST']}_sk{c['SPLIT_K']}"
                    f"_zp{c.get('ZP', 0)}_nw{c['num_warps']}"
                    + ("_fs" if c.get("FS") else "") + f"_{dt}")
            try:
                row = report(name, compile_gluon(W._int4_gemm_wgmma,
                                                 {"ZP": 0, "FS": False, **c}, dt), dump)
            except Exception as e:                   # report and go on
                print(f"{name}: FAILED {type(e).__name__}: {str(e)[-1500:]}")
                ok = False
                continue
            sts = 1 if c["SPLIT_K"] > 1 else 0            # the fixup's atomic, broadcast
            good = (row["wgmma"] > 0 and row["st.shared"] == sts and row.get("STS", 0) == sts
                    and row.get("LDGSTS<16B", 0) == 0 and not row.get("LOCAL"))
            print(f"{name}: shared {row['shared']} REG {row.get('REG')} wgmma {row['wgmma']} "
                  f"st.shared {row['st.shared']} ld.shared {row['ld.shared']} "
                  f"convert_layout {row['convert_layout']} cp.async<16B {row.get('LDGSTS<16B')} "
                  f"spilled {row.get('LOCAL')} "
                  f"{'ok' if good else 'FAIL'}")
            ok &= good
    return ok


SK_ARGS = ["x_ptr", "qw_ptr", "s_ptr", "z_ptr", "ws_ptr", "out_ptr", "cnt_ptr", "M", "N", "K", "G",
           "stride_xm", "stride_om", "stride_qw", "T", "S", "P"]


def streamk_report(dump) -> bool:
    """The stream-K configs (int_gemv_streamk.py, ring and PF): compile, no spills, 16-byte
    copies."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from runtime.kernels import int_gemv_gluon as G
    from runtime.kernels import int_gemv_streamk as SK
    ok = True
    for c in [c for c in G.CONFIGS + G.EXTRA if c.get("CTAS") in (2, 4)]:   # (CTAS: host side)
        for dt in ("bf16", "fp16"):
            name = (f"streamk_bn{c['BLOCK_N']}_bm{c['BLOCK_M']}_st{c['ST']}_pf{c['PF']}"
                    + ("_xl" if c.get("XL") else "") + f"_{dt}")
            consts = {"GROUP": 128, "BLOCK_N": c["BLOCK_N"], "BLOCK_K": c["BLOCK_K"],
                      "BLOCK_M": c["BLOCK_M"], "ST": c["ST"], "XS": c["XS"],
                      "EVICT": "evict_first" if c.get("EVICT") else "", "PF": c["PF"],
                      "XL": int(c.get("XL", 0))}
            sig, attrs = _sig(dt, consts, names=SK_ARGS)
            try:
                src = GluonASTSource(SK._int4_gemv_streamk, sig, constexprs=consts, attrs=attrs)
                row = report(name, triton.compile(src, target=TARGET,
                                                  options={"num_warps": c["num_warps"]}), dump)
            except Exception as e:                   # report and go on
                print(f"{name}: FAILED {type(e).__name__}: {str(e)[-1500:]}")
                ok = False
                continue
            good = row.get("LDGSTS<16B", 0) == 0 and not row.get("LOCAL") and row["mma"] > 0
            print(f"{name}: shared {row['shared']} REG {row.get('REG')} mma {row['mma']} "
                  f"cp.async<16B {row.get('LDGSTS<16B')} spilled {row.get('LOCAL')} "
                  f"{'ok' if good else 'FAIL'}")
            ok &= good
    return ok


TMA_ARGS = ["x_desc", "w_desc", "s_ptr", "z_ptr", "out_ptr", "fin_ptr", "cnt_ptr", "M", "N", "K",
            "G", "stride_om", "stride_fin"]


def tma_report(dump) -> bool:
    """The TMA-ring decode GEMV (int_gemv_tma.py, warp-specialized): every config compiles with
    no spills, its loop issues TMA copies (UTMALDG) and holds no CTA-wide barrier (the consumer
    warpgroup's named barriers, ``BAR.SYNC 0x0, 0x80``, are its own)."""
    from runtime.kernels import int_gemv_tma as T
    from triton.experimental.gluon._runtime import GluonASTSource
    ok = True
    for c in T.CONFIGS:
        for dt in ("bf16", "fp16"):
            wl, xl = T._layouts(bool(c.get("NK")))
            consts = {"GROUP": 128, "FIXUP": c["SPLIT_K"] > 1, "NK": False,
                      **{k: v for k, v in c.items() if k not in ("num_warps", "RG")}}
            sig = {"x_desc": f"tensordesc<{dt}[{c['BLOCK_M']}, 128],{xl!r}>",
                   "w_desc": f"tensordesc<i32[{c['BLOCK_N']}, 16],{wl!r}>", "s_ptr": "*fp16",
                   "z_ptr": "*u8", "out_ptr": "*fp32" if consts["FIXUP"] else "*" + dt,
                   "fin_ptr": "*" + dt, "cnt_ptr": "*i32"}
            sig.update({a: "i32" for a in TMA_ARGS[7:]})
            sig.update({k: "constexpr" for k in consts})
            attrs = {(TMA_ARGS.index(a),): DIV16 for a in ("s_ptr", "z_ptr", "out_ptr", "fin_ptr",
                                                           "cnt_ptr", "K", "stride_om", "stride_fin")}
            name = (f"tma_bn{c['BLOCK_N']}_bm{c['BLOCK_M']}_st{c['ST']}_sk{c['SPLIT_K']}"
                    f"_nw{c['num_warps']}_rg{c['RG']}" + ("_nk" if c.get("NK") else "") + f"_{dt}")
            try:
                k = triton.compile(GluonASTSource(T._int4_gemv_tma, sig, constexprs=consts, attrs=attrs),
                                   target=TARGET, options={"num_warps": c["num_warps"], "maxnreg": c["RG"]})
                row = report(name, k, dump)
            except Exception as e:                   # report and go on
                print(f"{name}: FAILED {type(e).__name__}: {str(e)[-1500:]}")
                ok = False
                continue
            _, sass = sass_counts(k.asm["cubin"])
            tma, cta_bar = sass.count("UTMALDG"), len(re.findall(r"BAR\.SYNC\.DEFER_BLOCKING 0x0 ;", sass))
            good = tma >= 2 and not row.get("LOCAL")
            print(f"{name}: REG {row.get('REG')} shared {row['shared']} UTMALDG {tma} "
                  f"CTA barriers {cta_bar} spilled {row.get('LOCAL')} {'ok' if good else 'FAIL'}")
            ok &= good
    return ok


def compile_existing(bn, bk, nw, dt, bm=16):
    from runtime.kernels import int_gemv as E
    consts = {"BITS": 4, "GROUP": 128, "MODE": 1, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm,
              "SPLIT_K": 1, "PERM": True, "INTERP": False}
    sig, attrs = _sig(dt, consts, gluon=False)
    src = ASTSource(E._int_gemv_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": nw, "num_stages": 1})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-site", help="site-packages with torch (for the existing kernel)")
    ap.add_argument("--dump", type=Path, help="write ttgir/ptx/sass per config here")
    ap.add_argument("--gemm", action="store_true", help="only the wgmma prefill prototype")
    ap.add_argument("--tma", action="store_true", help="only the TMA-ring decode GEMV")
    args = ap.parse_args()
    if args.gemm or args.tma:
        ok = gemm_report(args.dump) if args.gemm else tma_report(args.dump)
        print("PASS" if ok else "FAIL: see above")
        return 0 if ok else 1
    print(f"triton {triton.__version__}, target sm_{TARGET.arch}")
    cols = ["shared", "SHARED", "REG", "st.shared", "ld.shared", "ldmatrix", "STS", "LDS", "LDSM",
            "local_alloc", "convert_layout", "mma", "wgmma", "HMMA", "ld.global.v4", "ld.global", "LDG",
            "PRMT", "HADD2", "LOP3", "LDL", "STL"]
    print("kernel".ljust(34) + " ".join(c.rjust(len(c)) for c in cols))
    rows, ok = [], True
    from runtime.kernels import int_gemv_gluon as G
    cfgs = [(G.cfg(bn, bk), "bf16") for bn in (64, 128) for bk in (128, 256)]
    cfgs += [(G.cfg(64, 256), "fp16"), (G.cfg(64, 256, bm=8), "bf16"), (G.cfg(128, 256, nw=8), "bf16")]
    cfgs += [(G.cfg(bn, nw=nw, bm=bm, pf=pf), dt) for pf in (1, 2) for bn, nw, dt, bm in
             ((64, 4, "bf16", 16), (128, 4, "bf16", 16), (128, 8, "bf16", 16), (64, 4, "fp16", 16),
              (64, 4, "bf16", 8))]
    cfgs += [(G.cfg(bn, bk, bm=bm, st=4, xs=xs), "bf16") for bk in (128, 256) for xs in (False, True)
             for bn, bm in ((64, 16), (128, 16), (128, 8))]
    cfgs += [(c, "bf16") for c in G.CONFIGS if c["SPLIT_K"] > 1]        # with the fused fixup
    cfgs += [(G.cfg(128, 256, st=4, bm=8, xs=True, ev=True), "bf16"), (G.cfg(128, pf=2, ev=True), "bf16")]
    cfgs += [(c, "bf16") for c in G.CONFIGS + G.EXTRA
             if (c.get("XL") or c.get("FM")) and not c.get("CTAS")]      # (stream-K: below)
    cfgs += [(G.cfg(64, pf=3, xl=True), "fp16")]
    for c, dt in cfgs:
        pf, st = c["PF"], c["ST"]
        name = (f"gluon_bn{c['BLOCK_N']}_bk{c['BLOCK_K']}_w{c['num_warps']}_{dt}_bm{c['BLOCK_M']}"
                + (f"_pf{pf}" if pf else "") + (f"_st{st}" if st else "") + ("_xs" if c["XS"] else "")
                + (f"_sk{c['SPLIT_K']}" if c["SPLIT_K"] > 1 else "")
                + ("_ev" if c.get("EVICT") else "")
                + (f"_xl{c['XL']}" if c.get("XL") else "") + ("_fm" if c.get("FM") else "")
                + ("_ch2" if c["CH"] == 2 else ""))
        try:
            row = report(name, compile_gluon(G._int4_gemv_gluon, c, dt), args.dump)
        except Exception as e:                       # report and go on
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[-1500:]}")
            ok = False
            continue
        rows.append((name, row))
        print(name.ljust(34) + " ".join(str(row.get(c, "-")).rjust(len(c)) for c in cols))
        sts = 1 if c["SPLIT_K"] > 1 else 0            # the fixup's atomic, broadcast
        weights_smem_free = (row["st.shared"] == sts and row.get("STS", 0) == sts
                             and (row["shared"] == 0 or sts))
        ok &= (weights_smem_free or bool(st)) and not row.get("LOCAL")   # (ST: the ring)
    ok &= streamk_report(args.dump)
    if args.torch_site:
        sys.path.append(args.torch_site)
        for bn, bk in ((64, 128), (64, 256)):
            name = f"existing_bn{bn}_bk{bk}_w4_bf16"
            try:
                row = report(name, compile_existing(bn, bk, 4, "bf16"), args.dump)
                print(name.ljust(34) + " ".join(str(row.get(c, "-")).rjust(len(c)) for c in cols))
            except Exception as e:
                print(f"{name}: FAILED {type(e).__name__}: {str(e)[:400]}")
    print("PASS: every gluon config compiled; no shared memory but the cp.async ring (ST)" if ok else
          "FAIL: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
