"""The Triton quantized-matmul kernels against the plain-torch reference (runtime/kernels).

On CPU every kernel runs through Triton's interpreter (``interp.load_interpreted``: private
interpreted copies of the kernel modules, with TRITON_INTERPRET=1 only while they are imported
and while these tests run), on small shapes with tiny test-only configs, for every bits / group /
zero mode and nf4/fp4 (with and without double quantization), in float32, float16 and bfloat16.
Tests marked ``cuda`` run the compiled kernels (autotuned) on Llama-sized bf16 shapes.

Every input is fresh random data (seeded per case, never zeros); outputs are poisoned with NaN
before each run so that an unwritten element fails the comparison.
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
INTERP_OK = (not CUDA) and enable_interpreter()       # before anything imports triton compiled
interp_only = pytest.mark.skipif(not INTERP_OK, reason="CPU interpreter tests (no CUDA here, and "
                                 "triton not imported before this module)")

BITS, GROUPS, MODES = (2, 3, 4, 8), (32, 64, 128, -1), ("sym", "int", "min")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _spec(bits, group, mode):
    return QuantSpec("int", bits, group, sym=mode == "sym", zero_mode="int" if mode == "sym" else mode)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "output has NaN/inf (unwritten or overflowed elements)"
    return float((y.float() - ref.float()).norm() / ref.float().norm())


def _check(fn, x, t, spec, N, K, tol):
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype, device=x.device)
    y = fn(x, t, spec, N, K, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (x.shape[0], N) and y.dtype == x.dtype
    ref = R.ref_linear(x.float(), t, spec, N, K)
    err = _rel(y, ref)
    assert err < tol, f"{spec.name} M={x.shape[0]} N={N} K={K} {x.dtype}: rel err {err:.2e}"


K, _interpret_env = kernel_fixtures(INTERP_OK)


def _tiny(mod, cfg):
    mod.TUNER.override = [cfg]
    mod.TUNER.cache.clear()


# ----------------------------------------------------------------------------- int, interpreter

CASES = list(itertools.product(BITS, GROUPS, MODES))


@interp_only
@pytest.mark.parametrize("bits,group,mode", CASES)
def test_int_gemv_interpreted(K, bits, group, mode):
    i = CASES.index((bits, group, mode))
    N, Kd = (64, 128, 256)[i % 3], (128, 256)[i % 2]
    M, dtype = (1, 3, 16)[i % 3], DTYPES[i % 3]
    perm, split = bool(i % 2), 1 + (i % 4 == 1)
    spec = _spec(bits, group, mode)
    g = _gen("gemv", bits, group, mode)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _tiny(K.int_gemv, K.int_gemv._cfg(32, 64, sk=split, perm=perm))
    _check(K.int_gemv.int_gemv, x, t, spec, N, Kd, TOL[dtype])


SIMT_CASES = [c for c in CASES if c[0] != 3]


@interp_only
@pytest.mark.parametrize("bits,group,mode", SIMT_CASES)
def test_int_gemv_simt_interpreted(K, bits, group, mode):
    """The CUDA-core GEMV (M <= 4, 2/4/8 bits), M below BLOCK_M, cycling through its variants:
    FADD-free codes or not, prefetch, persistent grid, 128/64/32-bit chunks, BLOCK_K, split K,
    evict-first (each (bits, mode) gets both code paths)."""
    i = SIMT_CASES.index((bits, group, mode))
    N, Kd = (48, 128, 64)[i % 3], (256, 128)[i % 2]
    M, bm, dtype = ((1, 1), (3, 4), (2, 2))[i % 3] + (DTYPES[(i + 1) % 3],)
    split = (1, 2)[i % 2]
    bk = 128 if i % 3 == 2 and Kd % (128 * split) == 0 else 64
    cfg = K.int_gemv_simt.simt_cfg(16, bk, sk=split, bm=bm, vec=(4, 4, 2, 1)[i % 4],
                                   offset=(i // 3) % 2 == 0, evict=i % 7 != 3,
                                   persist=int(i % 5 == 0), pf=i % 2)
    spec = _spec(bits, group, mode)
    g = _gen("simt", bits, group, mode)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _tiny(K.int_gemv, cfg)
    _check(K.int_gemv.int_gemv, x, t, spec, N, Kd, TOL[dtype])


@interp_only
@pytest.mark.parametrize("mb", [1, 2, 4])
def test_int_gemv_simt_candidates_interpreted(K, mb):
    """Every config the autotuner may pick for the CUDA-core GEMV (int4 g128 uint8 zeros, the
    GPTQ grid), bf16, M = the bucket's largest or smallest, a partial row tile; K as short as
    the config allows (two K steps with prefetch)."""
    spec, N = _spec(4, 128, "int"), 40
    g = _gen("simt-cands", mb)
    cands = K.int_gemv_simt.simt_candidates(mb, 4)
    assert cands
    for j, cfg in enumerate(cands):
        Kd = cfg["BLOCK_K"] * cfg["SPLIT_K"] * (1 + cfg["PREFETCH"])
        assert K.int_gemv_simt.simt_valid(cfg, mb, Kd, 4, 128)
        t = R.random_quantized(spec, N, Kd, generator=g)
        x = torch.randn((mb, max(1, mb // 2 + 1))[j % 2], Kd, generator=g).to(torch.bfloat16)
        _tiny(K.int_gemv, cfg)
        _check(K.int_gemv.int_gemv, x, t, spec, N, Kd, TOL[torch.bfloat16])


@interp_only
def test_int_gemv_simt_groups_across_steps_and_x_views(K):
    """K steps smaller than a group with split-K slices that start mid-group (the group of each
    chunk is recomputed per step), and activations that are a view at an odd offset (read as
    int64 words: copied first), fp16 and fp32."""
    spec, N, Kd = _spec(4, 128, "int"), 40, 384
    g = _gen("simt-steps")
    t = R.random_quantized(spec, N, Kd, generator=g)
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(2, Kd + 1, generator=g).to(dtype)[:, 1:]
        _tiny(K.int_gemv, K.int_gemv_simt.simt_cfg(16, 64, sk=2, bm=2, pf=1))
        _check(K.int_gemv.int_gemv, x, t, spec, N, Kd, TOL[dtype])


@interp_only
@pytest.mark.parametrize("bits,group,mode", CASES)
def test_int_gemm_interpreted(K, bits, group, mode):
    i = CASES.index((bits, group, mode))
    N, Kd = (128, 64, 256)[i % 3], (256, 128)[i % 2]
    M, dtype, swap = 33, DTYPES[(i + 1) % 3], bool(i % 2)
    spec = _spec(bits, group, mode)
    g = _gen("gemm", bits, group, mode)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _tiny(K.int_gemm, K.int_gemm._cfg(32, 64, 64, swap=swap, nw=4, ns=1, gm=2))
    _check(K.int_gemm.int_gemm, x, t, spec, N, Kd, TOL[dtype])


# ----------------------------------------------------------------------------- nf4/fp4, interpreter

NF4_CASES = list(itertools.product(("nf4", "fp4"), (False, True), (64, -1)))


@interp_only
@pytest.mark.parametrize("fmt,dq,group", NF4_CASES)
def test_nf4_gemv_interpreted(K, fmt, dq, group):
    i = NF4_CASES.index((fmt, dq, group))
    N, Kd, M, dtype = (64, 128)[i % 2], 256, (1, 5, 16)[i % 3], DTYPES[i % 3]
    spec = QuantSpec(fmt, 4, group, double_quant=dq)
    g = _gen("nf4gemv", fmt, dq, group)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _tiny(K.nf4_gemv, K.nf4_gemv._cfg(32, 64, sk=1 + i % 2))
    _check(K.nf4_gemv.nf4_gemv, x, t, spec, N, Kd, TOL[dtype])


@interp_only
@pytest.mark.parametrize("fmt,dq,group", NF4_CASES)
def test_nf4_gemm_interpreted(K, fmt, dq, group):
    i = NF4_CASES.index((fmt, dq, group))
    N, Kd, M, dtype = (128, 64)[i % 2], 128, 40, DTYPES[(i + 1) % 3]
    spec = QuantSpec(fmt, 4, group, double_quant=dq)
    g = _gen("nf4gemm", fmt, dq, group)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _tiny(K.nf4_gemm, K.nf4_gemm._cfg(32, 64, 64, swap=bool(i % 2), nw=4, ns=1, gm=2))
    _check(K.nf4_gemm.nf4_gemm, x, t, spec, N, Kd, TOL[dtype])


# ----------------------------------------------------------------------------- reference vs formats

@pytest.mark.parametrize("bits,group,mode", [c for c in CASES if c[1] != 64])
def test_reference_matches_intq(bits, group, mode):
    from runtime.quant import intq
    spec = _spec(bits, group, mode)
    g = _gen("ref-int", bits, group, mode)
    N, Kd = 48, 256
    t = R.random_quantized(spec, N, Kd, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(R.dequant_int(t, spec, N, Kd, dtype), intq.dequantize(t, spec, N, Kd, dtype))
    w = torch.randn(N, Kd, generator=g)                     # their quantizer, our dequantizer
    q = intq.quantize(w, spec)
    assert torch.equal(R.dequant_int(q, spec, N, Kd), intq.dequantize(q, spec, N, Kd))


@pytest.mark.parametrize("fmt,dq,group", NF4_CASES)
def test_reference_matches_bnb4(fmt, dq, group):
    from runtime.quant import bnb4
    spec = QuantSpec(fmt, 4, group, double_quant=dq)
    assert torch.equal(R.code_table(fmt), bnb4.code_table(fmt))
    assert torch.equal(R.dynamic_map(), bnb4.dynamic_map())
    g = _gen("ref-nf4", fmt, dq, group)
    N, Kd = 32, 512
    t = R.random_quantized(spec, N, Kd, generator=g)
    assert torch.equal(R.dequant_nf4(t, spec, N, Kd), bnb4.dequantize(t, spec, N, Kd))
    q = bnb4.quantize(torch.randn(N, Kd, generator=g), spec)
    assert torch.equal(R.dequant_nf4(q, spec, N, Kd, torch.bfloat16),
                       bnb4.dequantize(q, spec, N, Kd, torch.bfloat16))


def test_dispatch_declines_what_it_cannot_run():
    from runtime.kernels import dispatch
    spec = QuantSpec("int", 4, 128)
    t = R.random_quantized(spec, 64, 256)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert dispatch.quant_linear(x, t, spec, 64, 256) is None               # CPU tensors
    assert not dispatch.supported(QuantSpec("int8", 8), 64, 256, torch.bfloat16)
    assert not dispatch.supported(spec, 64, 256, torch.float32)              # fp32 activations
    assert not dispatch.supported(QuantSpec("int", 4, 96), 64, 384, torch.bfloat16)   # g not 2**n
    assert not dispatch.supported(QuantSpec("int", 4, 128), 64, 320, torch.bfloat16)  # ragged group
    assert not dispatch.supported(spec, 64, 224, torch.bfloat16)                       # K % 64
    assert dispatch.supported(QuantSpec("nf4", 4, 64), 64, 256, torch.float16) == dispatch._HAS_TRITON


# ----------------------------------------------------------------------------- GPU

def _gpu_case(spec, N, Kd, M, dtype=torch.bfloat16, seed=0):
    from runtime.kernels import dispatch
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = R.random_quantized(spec, N, Kd, device="cuda", generator=g)
    x = torch.randn(M, Kd, device="cuda", generator=g).to(dtype)
    bias = torch.randn(N, device="cuda", generator=g).to(dtype)
    y = dispatch.quant_linear(x, t, spec, N, Kd, bias)
    assert y is not None and y.shape == (M, N) and y.dtype == dtype
    w = R.dequant(t, spec, N, Kd, torch.float32)
    ref = x.float() @ w.T + bias.float()
    return _rel(y, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 4, 17, 1000])
@pytest.mark.parametrize("spec", [QuantSpec("int", 4, 128), QuantSpec("nf4", 4, 64, double_quant=True)],
                         ids=lambda s: s.name)
def test_gpu_llama_shape(spec, M):
    err = _gpu_case(spec, 4096, 4096, M, seed=M)
    assert err < 1e-2, f"{spec.name} M={M}: rel err {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("spec", [QuantSpec("int", 4, 128), QuantSpec("nf4", 4, 64)], ids=lambda s: s.name)
def test_gpu_split_k_is_deterministic(spec):
    """Split-K partial sums are added in a fixed order: the same input gives the same bits."""
    from runtime.kernels import int_gemv, nf4_gemv
    mod = int_gemv if spec.fmt == "int" else nf4_gemv
    saved = mod.TUNER.override, dict(mod.TUNER.cache)
    g = torch.Generator(device="cuda").manual_seed(3)
    t = R.random_quantized(spec, 4096, 4096, device="cuda", generator=g)
    x = torch.randn(2, 4096, device="cuda", generator=g).to(torch.bfloat16)
    try:
        mod.TUNER.override, mod.TUNER.cache = [mod._cfg(64, 256, sk=8)], {}
        ys = [mod.int_gemv(x, t, spec, 4096, 4096) if spec.fmt == "int" else
              mod.nf4_gemv(x, t, spec, 4096, 4096) for _ in range(20)]
    finally:
        mod.TUNER.override, mod.TUNER.cache = saved
    assert all(torch.equal(y, ys[0]) for y in ys)
    ref = x.float() @ R.dequant(t, spec, 4096, 4096, torch.float32).T
    assert _rel(ys[0], ref) < 1e-2


@pytest.fixture
def one_config():
    """GPU format sweep: one config per kernel (each format compiles its own kernels)."""
    from runtime.kernels import int_gemm, int_gemv, nf4_gemm, nf4_gemv
    mods = (int_gemv, int_gemm, nf4_gemv, nf4_gemm)
    cfgs = (int_gemv._cfg(64, 64), int_gemm._cfg(64, 128, 64, True, 4, 3),
            nf4_gemv._cfg(64, 64), nf4_gemm._cfg(64, 128, 64, True, 4, 3))
    saved = [(m.TUNER.override, dict(m.TUNER.cache)) for m in mods]
    for m, c in zip(mods, cfgs):
        m.TUNER.override, m.TUNER.cache = [c], {}
    yield
    for m, (o, c) in zip(mods, saved):
        m.TUNER.override, m.TUNER.cache = o, c


@pytest.mark.cuda
@pytest.mark.parametrize("bits,group,mode", [c for i, c in enumerate(CASES) if i % 2 == 0 or c[0] == 4])
def test_gpu_every_int_format(one_config, bits, group, mode):
    spec = _spec(bits, group, mode)
    for M, dtype in ((1, torch.bfloat16), (9, torch.float16), (80, torch.bfloat16)):
        err = _gpu_case(spec, 512, 1024, M, dtype, seed=bits * 7 + M)
        assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), f"{spec.name} M={M} {dtype}: {err:.2e}"


@pytest.mark.cuda
@pytest.mark.parametrize("bits,group,mode", SIMT_CASES[::2])
def test_gpu_simt_every_int_format(bits, group, mode):
    """The CUDA-core GEMV compiled for half the 2/4/8-bit formats, M = 1..4, split K 1 and 2,
    FADD-free codes or not, prefetch and persistent grid on one of the two configs each."""
    from runtime.kernels import int_gemv
    from runtime.kernels.int_gemv_simt import simt_cfg
    spec = _spec(bits, group, mode)
    i = SIMT_CASES.index((bits, group, mode))
    saved = int_gemv.TUNER.override, dict(int_gemv.TUNER.cache)
    try:
        for M, bm, sk, dtype in ((1, 1, 1, torch.bfloat16), (3, 4, 2, torch.float16)):
            cfg = simt_cfg(32, 256, sk=sk, bm=bm, offset=(i // 2 + sk) % 2 == 0, pf=sk - 1,
                           persist=4 * (sk == 1 and i % 4 == 0))
            int_gemv.TUNER.override, int_gemv.TUNER.cache = [cfg], {}
            err = _gpu_case(spec, 512, 1024, M, dtype, seed=bits + M)
            assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), f"{spec.name} M={M}: {err:.2e}"
    finally:
        int_gemv.TUNER.override, int_gemv.TUNER.cache = saved


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,dq,group", NF4_CASES)
def test_gpu_every_nf4_format(one_config, fmt, dq, group):
    spec = QuantSpec(fmt, 4, group, double_quant=dq)
    for M, dtype in ((1, torch.bfloat16), (7, torch.float16), (64, torch.bfloat16)):
        err = _gpu_case(spec, 384, 1024, M, dtype, seed=M)
        assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), f"{spec.name} M={M} {dtype}: {err:.2e}"
