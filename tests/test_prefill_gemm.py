"""Prefill paths against the reference: "dequantize rows + cuBLAS" (runtime/kernels/dequant.py)
and the fused GEMMs' split-K (int_gemm / nf4_gemm with SPLIT_K > 1).

On CPU the dequantize kernels run through Triton's interpreter (``interp.load_interpreted``) and
``torch.mm`` stands in for cuBLAS; the GEMM tuners are forced onto the path (``DEQUANT`` config)
with a chunk smaller than the weight, so several chunks write their columns of ``out``. The
``cuda`` test runs it compiled on a Llama-sized shape. Inputs are fresh random data, outputs are
poisoned with NaN first.
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
K, _interpret_env = kernel_fixtures(INTERP_OK)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _int_spec(bits, group, mode):
    return QuantSpec("int", bits, group, sym=mode == "sym", zero_mode="int" if mode == "sym" else mode)


SPECS = [_int_spec(b, g, m) for b, g, m in itertools.product((2, 3, 4, 8), (32, 128, -1),
                                                              ("sym", "int", "min"))][::2] \
    + [QuantSpec(f, 4, g, double_quant=dq) for f, g, dq in
       itertools.product(("nf4", "fp4"), (64, -1), (False, True))][::2]


@interp_only
@pytest.mark.parametrize("i", range(len(SPECS)))
def test_dequantize_rows_matches_reference(K, i):
    spec, dtype = SPECS[i], DTYPES[i % 3]
    N, Kd = 96, (128, 192)[i % 2] if SPECS[i].group_size in (-1, 64) else 128
    t = R.random_quantized(spec, N, Kd, generator=_gen("rows", i))
    ref = R.dequant(t, spec, N, Kd, torch.float32)
    row0, rows = (0, N) if i % 3 == 0 else (17, 70)          # a slice, not tile-aligned
    buf = torch.full((rows + 5, Kd), float("nan"), dtype=dtype)
    w = K.dequant.dequantize_rows(t, spec, N, Kd, row0, rows, dtype, out=buf)
    assert w.shape == (rows, Kd) and w.data_ptr() == buf.data_ptr()
    assert torch.isfinite(w).all()
    part = ref[row0:row0 + rows]
    err = float((w.float() - part).abs().max() / part.abs().max())   # <= 2 ulps of dtype (16-bit math)
    assert err < {torch.float32: 1e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype], \
        f"{spec.name} {dtype}: max error {err:.2e} of the largest weight"
    assert torch.isnan(buf[rows:]).all(), "wrote past the requested rows"


@interp_only
@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_gemm_tuners_run_the_dequant_path_in_chunks(K, fmt, monkeypatch):
    spec = _int_spec(4, 32, "int") if fmt == "int" else QuantSpec("nf4", 4, 64)
    N, Kd, M = 2600, 128, 150                  # MIN_CHUNK_ROWS 1024: chunks of 1024, 1024, 552
    g = _gen("gemm", fmt)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(torch.bfloat16)
    mod = K.int_gemm if fmt == "int" else K.nf4_gemm
    mod.TUNER.override = [K.dequant.dequant_cfg(chunk_mb=0)]
    mod.TUNER.cache.clear()
    calls = []
    orig = K.dequant.dequantize_rows
    monkeypatch.setattr(K.dequant, "dequantize_rows", lambda *a, **k: calls.append(a[4:6]) or orig(*a, **k))
    out = torch.full((M, N), float("nan"), dtype=x.dtype)
    y = (mod.int_gemm if fmt == "int" else mod.nf4_gemm)(x, t, spec, N, Kd, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert calls == [(0, 1024), (1024, 1024), (2048, 552)]
    ref = R.ref_linear(x.float(), t, spec, N, Kd)
    err = float((y.float() - ref).norm() / ref.norm())
    assert torch.isfinite(y).all() and err < TOL[x.dtype], err


@interp_only
@pytest.mark.parametrize("fmt,sk,swap", [("int", 2, True), ("int", 4, False), ("nf4", 2, True),
                                         ("nf4", 4, True)])
def test_split_k_gemm_matches_reference(K, fmt, sk, swap):
    spec = _int_spec(4, 32, "int") if fmt == "int" else QuantSpec("nf4", 4, 64, double_quant=True)
    N, Kd, M = 96, 512, 37
    g = _gen("splitk", fmt, sk)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(torch.float16)
    mod = K.int_gemm if fmt == "int" else K.nf4_gemm
    mod.TUNER.override = [mod._cfg(32, 64, 64, swap=swap, nw=4, ns=1, gm=2, sk=sk)]
    mod.TUNER.cache.clear()
    out = torch.full((M, N), float("nan"), dtype=x.dtype)
    y = (mod.int_gemm if fmt == "int" else mod.nf4_gemm)(x, t, spec, N, Kd, out=out)
    ref = R.ref_linear(x.float(), t, spec, N, Kd)
    err = float((y.float() - ref).norm() / ref.norm())
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all() and err < TOL[x.dtype], err
    assert not mod._valid(mod._cfg(32, 64, 256, True, sk=4), *((N, 512, 4, 32) if fmt == "int" else (512, 64)))


def test_chunk_rows_bounds():
    from runtime.kernels.dequant import MIN_CHUNK_ROWS, chunk_rows
    assert chunk_rows(28672, 8192) == 4096                    # 64 MiB of bf16 rows
    assert chunk_rows(8192, 28672) == MIN_CHUNK_ROWS          # 64 MiB would be 1170 rows
    assert chunk_rows(500, 4096) == 500                       # never more than N
    assert chunk_rows(28672, 8192, chunk_mb=128) % 256 == 0


@interp_only
def test_dequantize_rows_rejects_bad_slices(K):
    spec = _int_spec(4, 32, "int")
    t = R.random_quantized(spec, 64, 128, generator=_gen("bad"))
    with pytest.raises(ValueError, match="outside"):
        K.dequant.dequantize_rows(t, spec, 64, 128, 60, 8, torch.float32)
    with pytest.raises(ValueError, match="row-major"):
        K.dequant.dequantize_rows(t, spec, 64, 128, 0, 8, torch.float32, out=torch.empty(8, 64))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int", "nf4"])
def test_dequant_matmul_cuda(fmt):
    from runtime.kernels import dequant
    spec = _int_spec(4, 128, "int") if fmt == "int" else QuantSpec("nf4", 4, 64)
    N, Kd, M = 14336, 4096, 512
    g = torch.Generator(device="cuda").manual_seed(1)
    t = R.random_quantized(spec, N, Kd, device="cuda", generator=g)
    x = torch.randn(M, Kd, device="cuda", generator=g).to(torch.bfloat16)
    for mb in (0, 64):                                      # several chunks, then one big chunk
        out = torch.full((M, N), float("nan"), device="cuda", dtype=x.dtype)
        y = dequant.dequant_matmul(x, t, spec, N, Kd, dequant.dequant_cfg(mb), out=out)
        ref = R.ref_linear(x.float(), t, spec, N, Kd)
        err = float((y.float() - ref).norm() / ref.norm())
        assert torch.isfinite(y).all() and err < 1.5e-2, (mb, err)
