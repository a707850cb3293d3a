"""The wgmma prefill prototype (runtime/kernels/int_gemm_gluon.py).

On the CPU: the host-side K order (``order``, ``permute_x``) composed with the kernel's
in-register relabelling (mirrored in torch by ``v3_relabel``) leaves ``W @ x.T`` unchanged.
On an sm_90 GPU (marker ``cuda``): every config against the plain-torch reference.
"""
from __future__ import annotations

import pytest
import torch

from interp import enable_interpreter

INTERP_OK = (not torch.cuda.is_available()) and enable_interpreter()   # before triton is imported compiled
from runtime.kernels import int_gemm_gluon as W  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


def test_order_is_a_permutation_of_a_subtile():
    o = W.order()
    assert sorted(o) == list(range(128)) and o != list(range(128))


def test_k_order_keeps_the_product():
    """The kernel builds A from the words as int_gemv_gluon does (physical k = 8 (4a + b) +
    4h + 2jh + jl -> order (b, a, jh, jl, h)), relabels K bits for wgmma, and reads x copied
    into ``order()``: the product must be the plain one."""
    g = torch.Generator().manual_seed(0)
    N, M, K = 8, 3, 256
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    v2 = (w.view(N, K // 128, 4, 4, 2, 2, 2)             # sub-tile, a, b, h, jh, jl
          .permute(0, 1, 3, 2, 5, 6, 4).reshape(N, K // 128, 128))
    a = W.v3_relabel(v2).reshape(N, K)
    xp = W.permute_x(x)
    torch.testing.assert_close(a @ xp.T, w @ x.T)
    assert not torch.allclose(w @ xp.T, w @ x.T)         # the order matters


def test_valid():
    ok = lambda c, K=4096: W.valid(c, 256, 4096, K, SPEC)   # noqa: E731
    assert all(ok(c) for c in W.CONFIGS)
    assert not ok(W.cfg(nw=8)) and not ok(W.cfg(st=1)) and not ok(W.cfg(bm=32))
    assert not W.valid(W.cfg(), 256, 4096, 4096, QuantSpec("int", 4, 64, zero_mode="int"))
    assert not W.valid(W.cfg(), 256, 4096, 4096, QuantSpec("int", 8, 128, zero_mode="int"))


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not (W.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
@pytest.mark.parametrize("c", W.CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,M", [(4096, 4096, 256), (300, 1024, 77), (1024, 8192, 512)])
def test_against_reference(c, dtype, N, K, M):
    g = torch.Generator(device="cuda").manual_seed(N + M)
    t = intq.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, SPEC)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    ref = x.float() @ intq.dequantize(t, SPEC, N, K).T
    y = W.launch(x, t, SPEC, N, K, c)
    assert y.shape == (M, N) and y.dtype == dtype and bool(torch.isfinite(y.float()).all())
    rel = float((y.float() - ref).norm() / ref.norm())
    assert rel < (1e-2 if dtype == torch.bfloat16 else 3e-3), rel
