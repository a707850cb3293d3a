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
from gluon_cases import group_scaled_case  # noqa: E402
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


def test_order_bits_and_the_gather_kernel():
    """k_order's bit map is ``order()``; its Triton gather (interpreted on the CPU) copies x into
    that order exactly, for a strided x and K of several sub-tiles."""
    if not INTERP_OK:
        pytest.skip("needs the CPU interpreter")
    from interp import load_interpreted
    K = load_interpreted(("runtime.kernels.k_order",)).k_order
    bits, o = K.order_bits(), W.order()
    assert sorted(bits) == list(range(7))
    assert all(o[k] == sum(1 << bits[b] for b in range(7) if k >> b & 1) for k in range(128))
    x = torch.randn(3, 2 * 384, dtype=torch.float32)[:, :384]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        assert torch.equal(K.permute_k(x), W.permute_x_ref(x))


def test_valid():
    ok = lambda c, K=4096: W.valid(c, 256, 4096, K, SPEC)   # noqa: E731
    assert all(ok(c) for c in W.CONFIGS)
    assert ok(W.cfg(128, 64, nw=4)) and ok(W.cfg(128, 128, nw=8))
    assert not ok(W.cfg(nw=8)) and not ok(W.cfg(128, nw=16)) and not ok(W.cfg(st=1))
    assert not ok(W.cfg(bm=48)) and not ok(W.cfg(bm=4))
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


def test_int_gemm_offers_the_tuned_configs_only_where_asked():
    from runtime.kernels import int_gemm as G
    glu = lambda cs: [c for c in cs if c.get("GLUON")]   # noqa: E731
    assert len(glu(G.candidates(256, 4, gluon=True))) == len(W.TUNED)
    assert len(glu(G.candidates(64, 4, gluon=True))) == len(W.TUNED)
    assert not glu(G.candidates(256, 4)) and not glu(G.candidates(2048, 4, gluon=True))
    assert not glu(G.candidates(256, 8, gluon=True)) and not glu(G.candidates(32, 4, gluon=True))
    c = glu(G.candidates(256, 4, gluon=True))[0]
    assert not G._valid(c, 4096, 4096, 4, 128)                       # needs the spec
    assert G._valid(c, 4096, 4096, 4, 128, 256, SPEC)
    assert not G._valid(c, 4096, 4096, 4, 64, 256, QuantSpec("int", 4, 64, zero_mode="int"))
    assert all(W.valid(t, 256, 4096, 4096, SPEC) for t in W.TUNED)
    assert all(t in W.CONFIGS for t in W.TUNED)
    assert not G.gluon_on(torch.zeros(2, 2, dtype=torch.bfloat16))      # a CPU tensor


def _tuned(mod, fn, M, tmp_path, monkeypatch):
    """Run ``fn`` (int_gemm / int_gemv of module ``mod``) once with a fresh tuner on a 2048x4096
    weight; check the pick's output against the reference; return what the tuner timed."""
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mod.TUNER, "cache", {})
    monkeypatch.setattr(mod.TUNER, "timings", {})
    N, K = 2048, 4096
    g = torch.Generator(device="cuda").manual_seed(M)
    t = intq.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, SPEC)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    y = fn(x, t, SPEC, N, K)
    ref = x.float() @ intq.dequantize(t, SPEC, N, K).T
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
    (timed,) = mod.TUNER.timings.values()
    return timed


@pytest.mark.cuda
@pytest.mark.skipif(not (W.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
def test_int_gemm_tunes_with_the_wgmma_kernel(tmp_path, monkeypatch):
    """Through int_gemm's tuner with a fresh cache: the Gluon configs pass the agreement check
    (they are timed) and the pick, whichever it is, matches the reference."""
    from runtime.kernels import int_gemm as G
    timed = _tuned(G, G.int_gemm, 200, tmp_path, monkeypatch)
    assert sum(1 for c, _ in timed if c.get("GLUON")) == len(W.TUNED)


@pytest.mark.cuda
@pytest.mark.skipif(not (W.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
@pytest.mark.parametrize("sk", [2, 4])
def test_split_k_fixup(sk, monkeypatch):
    """Split K: the tile's last program adds the partials (counters left at zero, the result
    bit-identical run to run); with no counters (as in a graph capture) torch adds them."""
    from runtime.kernels import splitk
    c = W.cfg(128, 256, st=2, nw=8, sk=sk)
    N, K, M = 1000, 4096, 300                        # ragged N and M: masked tiles
    g = torch.Generator(device="cuda").manual_seed(sk)
    t = intq.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, SPEC)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    ref = x.float() @ intq.dequantize(t, SPEC, N, K).T
    y1, y2 = W.launch(x, t, SPEC, N, K, c), W.launch(x, t, SPEC, N, K, c)
    assert torch.equal(y1, y2) and float((y1.float() - ref).norm() / ref.norm()) < 1e-2
    assert int(splitk.counters(x.device, 64).abs().sum()) == 0
    monkeypatch.setattr(splitk, "fused_counters", lambda *a: None)
    y3 = W.launch(x, t, SPEC, N, K, c)
    assert float((y3.float() - ref).norm() / ref.norm()) < 1e-2


def test_int_gemv_offers_the_decode_configs_only_where_asked():
    from runtime.kernels import int_gemv as V
    wg = lambda cs: [c for c in cs if c.get("WGMMA")]   # noqa: E731
    assert len(wg(V.candidates(16, 4, wgmma=True))) == len(W.DECODE)
    assert not wg(V.candidates(16, 4)) and not wg(V.candidates(8, 4, wgmma=True))
    assert not wg(V.candidates(16, 8, wgmma=True))
    assert all(W.valid(c, 16, 4096, 4096, SPEC) for c in W.DECODE)
    assert not W.valid(W.cfg(128, 8, nw=8), 8, 4096, 4096, SPEC)   # 8 rows of x, 8 warps
    assert not V.wgmma_on(torch.zeros(2, 2, dtype=torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.skipif(not (W.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
@pytest.mark.parametrize("c", W.DECODE, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("M", [1, 4, 13])
def test_decode_configs(c, M):
    N, K = 1000, 4096
    g = torch.Generator(device="cuda").manual_seed(M)
    t = intq.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, SPEC)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    ref = x.float() @ intq.dequantize(t, SPEC, N, K).T
    y = W.launch(x, t, SPEC, N, K, c)
    assert y.shape == (M, N) and float((y.float() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.cuda
@pytest.mark.skipif(not (W.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
@pytest.mark.parametrize("c", W.DECODE_X, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("K", [1024, 4096])
def test_decode_x_configs(c, K):
    """The tried configs: right against the reference, ZP's carried zeros/scales included where
    a split holds fewer sub-tiles than ZP (K 1024 at split 4: 2 sub-tiles), and where the
    zeros/scales of neighbouring sub-tiles differ (each group's scale set apart)."""
    N, M = 1000, min(13, c["BLOCK_M"])
    t, x, ref = group_scaled_case(N, K, M, SPEC, K)
    y = W.launch(x, t, SPEC, N, K, c)
    assert y.shape == (M, N) and float((y.float() - ref).norm() / ref.norm()) < 1e-2
    if c.get("ZP"):                                    # the same bits as loaded at use
        assert torch.equal(y, W.launch(x, t, SPEC, N, K, {**c, "ZP": 0}))


@pytest.mark.cuda
@pytest.mark.skipif(not (W.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
def test_int_gemv_tunes_with_the_decode_configs(tmp_path, monkeypatch):
    from runtime.kernels import int_gemv as V
    monkeypatch.setenv("EXA_GEMV_WGMMA", "1")
    timed = _tuned(V, V.int_gemv, 16, tmp_path, monkeypatch)
    assert sum(1 for c, _ in timed if c.get("WGMMA")) == len(W.DECODE)
