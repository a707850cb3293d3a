"""The CUDA-core nf4/fp4 GEMV (runtime/kernels/nf4_gemv_simt.py) against the torch reference.

On CPU the kernel runs through Triton's interpreter (``interp.load_interpreted``), where the code
lookup reads the 16 float32 values from memory instead of the warp shuffle; the shuffle's PTX is
checked separately by emulating it for a whole warp. Tests marked ``cuda`` run the compiled
kernel (the shuffle path) on every format. Every input is fresh random data; outputs are
poisoned with NaN before each run so that an unwritten element fails the comparison.
"""
from __future__ import annotations

import itertools
import re
import struct
import zlib

import pytest
import torch

from interp import enable_interpreter, kernel_fixtures
from runtime.kernels import reference as R
from runtime.quant.spec import QuantSpec

CUDA = torch.cuda.is_available()
INTERP_OK = (not CUDA) and enable_interpreter()       # before anything imports triton compiled
interp_only = pytest.mark.skipif(not INTERP_OK, reason="CPU interpreter tests (no CUDA here, and "
                                 "triton not imported before this module)")
# fp32 and fp16 results are the float32 sum rounded once; the interpreter's float32 -> bf16
# cast truncates (the GPU rounds), so bf16 outputs can be 1 ulp off
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _run(gemv, x, t, spec, N, K):
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype, device=x.device)
    y = gemv(x, t, spec, N, K, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (x.shape[0], N) and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "output has NaN/inf (unwritten or overflowed elements)"
    ref = x.float() @ R.dequant(t, spec, N, K, torch.float32).T       # float32 truth
    return float((y.float() - ref).norm() / ref.norm())


K, _interpret_env = kernel_fixtures(INTERP_OK)


# ----------------------------------------------------------------------------- interpreter

# (M, BLOCK_M, dtype, (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, PREFETCH)); N = 40 is not a
# multiple of BLOCK_N
RUNS = [(1, 1, torch.bfloat16, (16, 256, 1, 4, True)), (2, 2, torch.float16, (32, 128, 2, 2, False)),
        (3, 4, torch.float32, (16, 64, 4, 4, True)), (4, 4, torch.bfloat16, (8, 512, 1, 4, False)),
        (1, 1, torch.float16, (32, 64, 2, 2, False)), (2, 2, torch.float32, (16, 512, 1, 4, True))]
CASES = list(itertools.product(("nf4", "fp4"), (False, True), (64, 128, -1)))


@interp_only
@pytest.mark.parametrize("fmt,dq,group", CASES)
def test_nf4_simt_interpreted(K, fmt, dq, group):
    """Every format and block size; per case three of RUNS (M = 1..4, fp32/fp16/bf16, tiles in
    one block and over several blocks, split K, prefetch), through ``nf4_gemv`` with a SIMT
    config."""
    i = CASES.index((fmt, dq, group))
    spec = QuantSpec(fmt, 4, group, double_quant=dq)
    N, Kd = 40, 1024
    g = _gen("nf4simt", fmt, dq, group)
    t = R.random_quantized(spec, N, Kd, generator=g)
    for M, bm, dtype, (bn, bk, sk, nw, pf) in (RUNS[i % 6], RUNS[(i + 2) % 6], RUNS[(i + 4) % 6]):
        cfg = K.nf4_gemv_simt.simt_cfg(bn, bk, sk, nw, bm, pf)
        assert K.nf4_gemv_simt.simt_valid(cfg, M, Kd, Kd if group == -1 else group), cfg
        x = torch.randn(M, Kd, generator=g).to(dtype)
        K.nf4_gemv.TUNER.override = [cfg]
        K.nf4_gemv.TUNER.cache.clear()
        err = _run(K.nf4_gemv.nf4_gemv, x, t, spec, N, Kd)
        assert err < TOL[dtype], f"{spec.name} M={M} {dtype} {cfg}: rel err {err:.2e}"


@interp_only
def test_nf4_simt_strided_x_and_fp4_zero_codes(K):
    """x rows with an odd stride or an odd start (read as int32 pairs after a copy), and the
    fp4 codes including both zeros, against the reference."""
    spec = QuantSpec("fp4", 4, 64)
    N, Kd = 16, 256
    g = _gen("strided")
    t = R.random_quantized(spec, N, Kd, generator=g)
    t["qweight"][: 8] = torch.tensor([0x08, 0x80, 0x19, 0x2A, 0x3B, 0x4C, 0x5D, 0x6E], dtype=torch.uint8)
    K.nf4_gemv.TUNER.override = [K.nf4_gemv_simt.simt_cfg(16, 64, 1, 4, 2)]
    K.nf4_gemv.TUNER.cache.clear()
    base = torch.randn(2, Kd + 1, generator=g).to(torch.float16)
    x = base[:, :Kd]                                       # row stride K + 1
    assert _run(K.nf4_gemv.nf4_gemv, x, t, spec, N, Kd) < TOL[torch.float16]
    x = base.reshape(-1)[1: 1 + 2 * Kd].view(2, Kd)        # contiguous, 2 bytes off alignment
    assert x.data_ptr() % 4 == 2
    assert _run(K.nf4_gemv.nf4_gemv, x, t, spec, N, Kd) < TOL[torch.float16]


def test_candidates_are_valid_for_llama_shapes():
    from runtime.kernels.nf4_gemv_simt import simt_candidates, simt_valid
    assert simt_candidates(8) == [] and simt_candidates(16) == []
    for M in (1, 2, 4):
        cands = simt_candidates(M)
        assert 0 < len(cands) <= 12 and all(c["SIMT"] and c["BLOCK_M"] == M for c in cands)
        for Kd in (4096, 8192, 14336, 28672):
            assert all(simt_valid(c, M, Kd, 64) for c in cands), (M, Kd)
    from runtime.kernels.nf4_gemv import candidates
    assert sum(1 for c in candidates(1) if c.get("SIMT")) == len(simt_candidates(1))


# ----------------------------------------------------------------------------- the shuffle's PTX

def _emulate_warp(asm: str, words: list[int]) -> list[list[int]]:
    """Run the inline asm of ``_values8`` for the 32 lanes of a warp (lane l gets words[l]);
    returns the 8 outputs of every lane. Covers exactly the instructions the asm uses, with
    shfl.sync.idx as the PTX ISA defines it (segment mask c[12:8], clamp c[4:0])."""
    regs = [{"$8": words[lane] & 0xFFFFFFFF} for lane in range(32)]

    def val(lane, a):
        if a == "%laneid":
            return lane
        if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", a):
            return int(a, 0)
        return regs[lane][a]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        if op.startswith("shfl.sync.idx"):
            d, a, b, c = args[:4]
            src = [val(lane, a) for lane in range(32)]
            for lane in range(32):
                cv = val(lane, c)
                seg, clamp = (cv >> 8) & 31, cv & 31
                j = (lane & seg) | (val(lane, b) & 31 & ~seg)
                if j > ((lane & seg) | (clamp & ~seg)):
                    j = lane
                regs[lane][d] = src[j]
            continue
        for lane in range(32):
            r = regs[lane]
            if op == "mov.u32":
                r[args[0]] = val(lane, args[1])
            elif op == "and.b32":
                r[args[0]] = val(lane, args[1]) & val(lane, args[2])
            elif op == "setp.ne.b32":
                r[args[0]] = val(lane, args[1]) != val(lane, args[2])
            elif op == "selp.b32":
                r[args[0]] = val(lane, args[1]) if r[args[3]] else val(lane, args[2])
            elif op == "shr.u32":
                r[args[0]] = val(lane, args[1]) >> val(lane, args[2])
            else:
                raise AssertionError(f"emulator lacks {op}")
    return [[regs[lane][f"${j}"] for j in range(8)] for lane in range(32)]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_shuffle_asm_reads_the_table_in_bnb_order(fmt):
    """Code j of a word (byte j // 2, high nibble first) -> bits of the float32 table value."""
    from runtime.kernels.nf4_gemv_simt import SHFL_ASM
    table = [struct.unpack("<I", struct.pack("<f", v))[0] for v in R.code_table(fmt).tolist()]
    g = _gen("asm", fmt)
    for _ in range(8):
        words = torch.randint(0, 2 ** 32, (32,), generator=g, dtype=torch.int64).tolist()
        got = _emulate_warp(SHFL_ASM[fmt], words)
        for lane, w in enumerate(words):
            codes = [(w >> (8 * (j // 2) + (4 if j % 2 == 0 else 0))) & 15 for j in range(8)]
            assert got[lane] == [table[c] for c in codes], (lane, hex(w))
    # every code in every lane at least once: words 0x01234567.. rotated per lane
    words = [int("".join("%x" % ((lane + i) % 16) for i in range(8)), 16) for lane in range(32)]
    got = _emulate_warp(SHFL_ASM[fmt], words)
    for lane, w in enumerate(words):
        assert got[lane] == [table[(w >> (8 * (j // 2) + (4 if j % 2 == 0 else 0))) & 15]
                             for j in range(8)]


# ----------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.parametrize("fmt,dq,group", [c for c in CASES if c[2] != 128])
def test_gpu_nf4_simt_every_format(fmt, dq, group):
    """The compiled kernel (warp-shuffle lookup) for every candidate shape class, M = 1..4."""
    from runtime.kernels import nf4_gemv
    from runtime.kernels.nf4_gemv_simt import simt_cfg
    spec = QuantSpec(fmt, 4, group, double_quant=dq)
    N, Kd = 520, 2048
    gen = torch.Generator(device="cuda").manual_seed(7)
    t = R.random_quantized(spec, N, Kd, device="cuda", generator=gen)
    saved = nf4_gemv.TUNER.override, dict(nf4_gemv.TUNER.cache)
    try:
        for M, bm, dtype, (bn, bk, sk, nw, pf) in ((1, 1, torch.bfloat16, (64, 256, 1, 4, False)),
                                                   (1, 1, torch.float16, (32, 512, 1, 4, True)),
                                                   (2, 2, torch.bfloat16, (32, 256, 8, 2, False)),
                                                   (3, 4, torch.float16, (32, 256, 4, 4, False)),
                                                   (4, 4, torch.bfloat16, (64, 256, 2, 8, False)),
                                                   (4, 4, torch.float16, (32, 256, 2, 4, True))):
            nf4_gemv.TUNER.override = [simt_cfg(bn, bk, sk, nw, bm, pf)]
            nf4_gemv.TUNER.cache = {}
            x = torch.randn(M, Kd, device="cuda", generator=gen).to(dtype)
            err = _run(nf4_gemv.nf4_gemv, x, t, spec, N, Kd)
            assert err < (4e-3 if dtype == torch.bfloat16 else 1e-3), f"{spec.name} M={M}: {err:.2e}"
    finally:
        nf4_gemv.TUNER.override, nf4_gemv.TUNER.cache = saved


@pytest.mark.cuda
def test_gpu_nf4_simt_tuned_and_deterministic():
    """Tuned over all candidates (SIMT and tensor-core) at M = 1: the pick is right and repeats
    bit for bit (split-K partial sums are added in a fixed order)."""
    from runtime.kernels import dispatch, nf4_gemv
    spec = QuantSpec("nf4", 4, 64, double_quant=True)
    gen = torch.Generator(device="cuda").manual_seed(11)
    t = R.random_quantized(spec, 4096, 4096, device="cuda", generator=gen)
    x = torch.randn(1, 4096, device="cuda", generator=gen).to(torch.bfloat16)
    ys = [dispatch.quant_linear(x, t, spec, 4096, 4096) for _ in range(10)]
    assert all(torch.equal(y, ys[0]) for y in ys)
    ref = x.float() @ R.dequant(t, spec, 4096, 4096, torch.float32).T
    assert float((ys[0].float() - ref).norm() / ref.norm()) < 4e-3
    assert any(k[0] == 4096 and k[2] == 1 for k in nf4_gemv.TUNER.cache)
