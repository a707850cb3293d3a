"""The CUDA-core int GEMV's XJOIN path (``int_gemv_simt``, M = 2..8: one FFMA chain per (weight
row, x row), activations loaded per x row, converted once per thread and joined in registers)
against the plain-torch reference, through Triton's CPU interpreter (see tests/interp.py).

Fresh random inputs, seeded per case; outputs poisoned with NaN first (an unwritten element
fails). Tests marked ``cuda`` run the compiled kernel.
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from interp import enable_interpreter, kernel_fixtures
from runtime.kernels import reference as R
from runtime.quant.spec import QuantSpec

CUDA = torch.cuda.is_available()
INTERP_OK = (not CUDA) and enable_interpreter()
interp_only = pytest.mark.skipif(not INTERP_OK, reason="CPU interpreter tests")

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}
CASES = list(itertools.product((2, 4, 8), (32, 64, 128, -1), ("sym", "int", "min")))

K, _interpret_env = kernel_fixtures(INTERP_OK)


def _spec(bits, group, mode):
    return QuantSpec("int", bits, group, sym=mode == "sym",
                     zero_mode="int" if mode == "sym" else mode)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _check(mod, cfg, x, t, spec, N, Kd, tol):
    mod.TUNER.override = [cfg]
    mod.TUNER.cache.clear()
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    y = mod.int_gemv(x, t, spec, N, Kd, out=out)
    assert y.data_ptr() == out.data_ptr() and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "NaN/inf in the output (unwritten elements?)"
    ref = R.ref_linear(x.float(), t, spec, N, Kd)
    err = float((y.float() - ref).norm() / ref.norm())
    assert err < tol, f"{spec.name} M={x.shape[0]} {x.dtype} {cfg}: rel err {err:.2e}"


@interp_only
@pytest.mark.parametrize("bits,group,mode", CASES)
def test_simt_join_every_format(K, bits, group, mode):
    """Every 2/4/8-bit format, M = 1..8 under BLOCK_M 1..8, bf16 / fp16 / fp32, cycling through
    the variants: FADD-free codes or not, 128/64/32-bit chunks, split K, prefetch, persistent
    grid, BLOCK_N / BLOCK_K, a partial row tile."""
    i = CASES.index((bits, group, mode))
    M, bm = ((2, 2), (3, 4), (5, 8), (8, 8), (1, 2), (4, 4), (7, 8))[i % 7]
    N, Kd, dtype = (48, 40, 64)[i % 3], (256, 128)[i % 2], DTYPES[i % 3]
    split = 1 + (i % 4 == 1)
    bk = 128 if Kd % (128 * split) == 0 and i % 3 else 64
    cfg = K.int_gemv_simt.simt_cfg((16, 32)[i % 2], bk, sk=split, bm=bm, vec=(4, 4, 2, 1)[i % 4],
                                   offset=(i // 2) % 2 == 0, evict=i % 5 != 2, pf=int(i % 3 == 1),
                                   persist=int(i % 6 == 0), join=1)
    assert K.int_gemv_simt.simt_valid(cfg, M, Kd, bits, Kd if group == -1 else group)
    spec = _spec(bits, group, mode)
    g = _gen("simt-join", bits, group, mode)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _check(K.int_gemv, cfg, x, t, spec, N, Kd, TOL[dtype])


@interp_only
def test_simt_join_x_views_and_short_steps(K):
    """Activations that are a strided view at an odd offset (read as int64 words: copied
    first), K steps smaller than a group with split-K slices starting mid-group, M = 6 of 8."""
    spec, N, Kd = _spec(4, 128, "int"), 40, 384
    g = _gen("simt-join-views")
    t = R.random_quantized(spec, N, Kd, generator=g)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(12, Kd + 1, generator=g).to(dtype)[::2, 1:]
        cfg = K.int_gemv_simt.simt_cfg(16, 64, sk=2, bm=8, pf=1, join=1)
        _check(K.int_gemv, cfg, x, t, spec, N, Kd, TOL[dtype])


@interp_only
def test_simt_candidates_per_bucket(K):
    """M buckets 2 and 4 get CUDA-core candidates, all XJOIN, valid for the Llama shapes;
    none past 4 (M = 8 lost to the tensor cores on the H100) nor for 3 bits, nor where raw
    activations would pass 128 registers a thread; float32 activations get BLOCK_K / 2 (x's
    tile per row below the thread count)."""
    S = K.int_gemv_simt
    for mb in (2, 4):
        for bits, xbytes in ((4, 2), (4, 4), (8, 2), (8, 4), (2, 2), (2, 4)):
            cands = S.simt_candidates(mb, bits, xbytes)
            assert all(32 * mb * xbytes // bits * (1 + c["PREFETCH"]) <= 128 for c in cands)
            if 32 * mb * xbytes // bits > 128:
                assert cands == []
                continue
            assert cands and all(c["XJOIN"] and c["BLOCK_M"] == mb for c in cands)
            for c in cands:
                assert S.simt_valid(c, mb, 8192, bits, 128) and S.simt_valid(c, mb, 4096, bits, 128)
                assert c["BLOCK_K"] * xbytes // 8 < 32 * c["num_warps"]
    assert S.simt_candidates(8, 4) == [] and S.simt_candidates(16, 4) == [] \
        and S.simt_candidates(4, 3) == []


@pytest.mark.cuda
@pytest.mark.parametrize("bits,group,mode", CASES[::3])
def test_gpu_simt_join(bits, group, mode):
    """The compiled XJOIN path, M = 2, 5, 8, bf16 and fp16, split K 1 and 2."""
    from runtime.kernels import int_gemv
    from runtime.kernels.int_gemv_simt import simt_cfg
    spec = _spec(bits, group, mode)
    g = torch.Generator(device="cuda").manual_seed(bits)
    t = R.random_quantized(spec, 512, 1024, device="cuda", generator=g)
    saved = int_gemv.TUNER.override, dict(int_gemv.TUNER.cache)
    try:
        for M, bm, sk, dtype in ((2, 2, 1, torch.bfloat16), (5, 8, 2, torch.float16),
                                 (8, 8, 1, torch.bfloat16)):
            x = torch.randn(M, 1024, device="cuda", generator=g).to(dtype)
            cfg = simt_cfg(64, 256, sk=sk, bm=bm, join=1)
            int_gemv.TUNER.override, int_gemv.TUNER.cache = [cfg], {}
            y = int_gemv.int_gemv(x, t, spec, 512, 1024)
            ref = x.float() @ R.dequant(t, spec, 512, 1024, torch.float32).T
            err = float((y.float() - ref).norm() / ref.norm())
            tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
            assert err < tol, f"{spec.name} M={M}: {err:.2e}"
    finally:
        int_gemv.TUNER.override, int_gemv.TUNER.cache = saved
