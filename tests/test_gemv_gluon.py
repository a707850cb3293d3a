"""The Gluon int4 GEMV prototype (runtime/kernels/int_gemv_gluon.py) against the plain-torch
reference: ``x @ dequantize(t).T`` in float32. GPU only (marker ``cuda``; conftest skips it
elsewhere). Run: ``python3 -m pytest -q -m cuda tests/test_gemv_gluon.py``; timing:
benchmarks/gluon_gemv.py.
"""
from __future__ import annotations

import pytest
import torch

from interp import enable_interpreter

INTERP_OK = (not torch.cuda.is_available()) and enable_interpreter()   # before triton is imported compiled
from runtime.kernels import int_gemv_gluon as G  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")
gpu = pytest.mark.skipif(not G.HAVE_GLUON, reason="triton.experimental.gluon missing")


def _inputs(N, K, M, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.05
    t = intq.quantize(w, SPEC)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    ref = x.float() @ intq.dequantize(t, SPEC, N, K).T           # float32 [M, N]
    return x, t, ref


def _check(y, ref, dtype, M, N):
    assert y.shape == (M, N) and y.dtype == dtype
    y = y.float()
    assert bool(torch.isfinite(y).all())
    rel = float((y - ref).norm() / ref.norm())
    # q - z and the products are exact; float32 sums, then one rounding to x's dtype
    assert rel < (8e-3 if dtype == torch.bfloat16 else 2e-3), rel
    tol = (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10) * ref.abs().max() + 1e-3
    assert float((y - ref).abs().max()) <= 4 * float(tol)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 8, 16])
@pytest.mark.parametrize("N,K", [(256, 512), (4096, 4096), (256, 4096), (4096, 512)])
def test_default_configs(N, K, M, dtype):
    x, t, ref = _inputs(N, K, M, dtype)
    for c in (G.cfg(64, 128), G.cfg(64, 256), G.cfg(128, 128)):
        if G.valid(c, M, N, K, SPEC):
            _check(G.launch(x, t, SPEC, N, K, c), ref, dtype, M, N)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("c", G.CONFIGS + G.EXTRA, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_all_configs(c):
    N, K = 4096, 4096
    for M in (1, 5, 8, 16):
        x, t, ref = _inputs(N, K, M, torch.bfloat16, seed=M)
        if G.valid(c, M, N, K, SPEC):
            _check(G.launch(x, t, SPEC, N, K, c), ref, torch.bfloat16, M, N)


def test_fm_only_where_every_row_is_one_of_x():
    """FM (x loaded without a mask) goes with a PF loop, M = BLOCK_M and no stream-K."""
    ok = lambda c, M: G.valid(c, M, 4096, 4096, SPEC)   # noqa: E731
    assert ok(G.cfg(128, pf=3, bm=8, fm=True), 8) and not ok(G.cfg(128, pf=3, bm=8, fm=True), 7)
    assert ok(G.cfg(128, pf=2, fm=True), 16) and not ok(G.cfg(128, pf=2, fm=True), 8)
    assert "FM" not in G.cfg(64, 256, fm=True) and not ok({**G.cfg(64, 256), "FM": True}, 16)
    assert not ok(G.cfg(128, pf=2, fm=True, ctas=2), 16)


def _check_same_bits(c, other, M, N, K, dtype, seed):
    """Config ``c`` is right on fresh inputs and gives exactly config ``other``'s bits."""
    x, t, ref = _inputs(N, K, M, dtype, seed=seed)
    y = G.launch(x, t, SPEC, N, K, c)
    _check(y, ref, dtype, M, N)
    assert torch.equal(y, G.launch(x, t, SPEC, N, K, other))


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("c", [c for c in G.EXTRA if c.get("FM")], ids=str)
@pytest.mark.parametrize("N,K", [(300, 640), (4096, 1024), (256, 8192)])
def test_fm_gives_the_masked_loads_bits(c, N, K):
    """At M = BLOCK_M the unmasked x loads read what the masked ones do: the same bits, bf16
    and fp16, 1-5 sub-tiles per split included."""
    M = c["BLOCK_M"]
    plain = {k: v for k, v in c.items() if k != "FM"}
    for dtype in (torch.bfloat16, torch.float16):
        if not G.valid(c, M, N, K, SPEC):
            assert K % (128 * c["SPLIT_K"])
            continue
        _check_same_bits(c, plain, M, N, K, dtype, seed=N + K)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("c", [G.cfg(128, pf=1, xl=2), G.cfg(128, sk=4, pf=2, bm=8, xl=2),
                               G.cfg(128, pf=3, xl=2)], ids=str)
@pytest.mark.parametrize("M", [3, 8, 16])
def test_xl2_gives_xl1_bits(c, M):
    """x loaded one sub-tile ahead (XL 2) gives the bits of x loaded at use (XL 1), 1-5
    sub-tiles per split (every remainder of the unrolled loops) and ragged N included."""
    for N, K in ((300, 640), (4096, 1024), (256, 8192)):
        if not G.valid(c, M, N, K, SPEC):
            assert M > c["BLOCK_M"] or K % (128 * c["SPLIT_K"])
            continue
        _check_same_bits(c, {**c, "XL": 1}, M, N, K, torch.bfloat16, seed=N + K + M)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("c", [G.cfg(64, pf=1), G.cfg(128, pf=2), G.cfg(128, pf=2, xl=True),
                               G.cfg(64, 256)])
def test_x_rows_at_odd_offsets(c):
    """x a view whose rows start at odd bf16 offsets (odd row stride, data 2 bytes past a word):
    the PF loops read x as 32-bit words, so ``launch`` gives them an aligned copy."""
    N, K, M = 256, 1024, 5
    x, t, ref = _inputs(N, K, M, torch.bfloat16, seed=5)
    big = torch.zeros(M, K + 1, device="cuda", dtype=torch.bfloat16)
    big[:, 1:] = x
    xv = big[:, 1:]
    assert xv.stride(0) % 2 == 1 and xv.data_ptr() % 4 == 2
    _check(G.launch(xv, t, SPEC, N, K, c), ref, torch.bfloat16, M, N)


@pytest.mark.cuda
@gpu
def test_ragged_n_and_strided_out():
    """N not a multiple of BLOCK_N (rows are clamped on load, masked on store)."""
    N, K, M = 300, 1024, 7
    x, t, ref = _inputs(N, K, M, torch.bfloat16, seed=3)
    _check(G.launch(x, t, SPEC, N, K, G.cfg(64, 256)), ref, torch.bfloat16, M, N)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("pf,st,bk,xo", [(1, 0, 128, 0), (2, 0, 128, 0), (3, 0, 128, 0),
                                         (1, 0, 128, 1), (2, 0, 128, 1), (3, 0, 128, 1),
                                         (1, 0, 128, 2), (2, 0, 128, 2), (3, 0, 128, 2),
                                         (0, 4, 128, 0), (0, 8, 128, 0),
                                         (0, 4, 256, 0), (0, 4, 128, 1), (0, 4, 256, 1)])
@pytest.mark.parametrize("N,K,sk", [(300, 128, 1), (300, 256, 1), (300, 384, 1), (300, 512, 1),
                                    (300, 640, 1), (4096, 1024, 4), (256, 8192, 2)])
def test_prefetch_edges(N, K, sk, pf, st, bk, xo):
    """PF loops (xo: XL, x loaded at use (1) or one step ahead (2)) and the cp.async ring (xo:
    XS, x in it too): fewer sub-tiles per split than the prefetch distance or ring slots (the
    prefetch wraps), 1-5 sub-tiles (every remainder of the PF loops' unrolling by PF + 1),
    ragged N, bf16, fp16."""
    c = G.cfg(64, bk, sk=sk, pf=pf, st=st, xs=bool(xo), xl=xo)
    assert bool(xo) == bool(c.get("XS") or c.get("XL"))
    if not G.valid(c, 7, N, K, SPEC):
        assert K % (bk * sk)                     # K not a whole number of steps
        return
    for dtype in (torch.bfloat16, torch.float16):
        x, t, ref = _inputs(N, K, 7, dtype, seed=K + pf + st)
        _check(G.launch(x, t, SPEC, N, K, c), ref, dtype, 7, N)


def test_ring_needs_two_steps_of_slots():
    """A ring of ST slots read NSUB = BLOCK_K/128 sub-tiles a step must hold 2 NSUB sub-tiles
    (the copies issued in a step may not land in a slot that step still reads); XS goes with
    a ring and 4 warps, XL with a PF loop."""
    ok = lambda c: G.valid(c, 8, 4096, 4096, SPEC)   # noqa: E731
    assert ok(G.cfg(64, 256, st=4)) and not ok(G.cfg(64, 256, st=3))
    assert ok(G.cfg(64, 128, st=2)) and ok(G.cfg(64, 128, st=4, xs=True))
    assert not ok(G.cfg(128, 128, st=4, xs=True, nw=8))
    assert not G.cfg(64, 128, xs=True)["XS"]                  # no ring: no XS
    assert not G.cfg(128, pf=2, xs=True)["XS"]                # PF: no ring
    assert not ok({**G.cfg(128, pf=2), "XS": True})
    assert ok(G.cfg(128, pf=1, xl=True)) and G.cfg(128, pf=3, xl=True)["XL"]
    assert "XL" not in G.cfg(64, 256, xl=True) and "XL" not in G.cfg(64, 128, st=4, xl=True)
    assert not ok({**G.cfg(64, 256), "XL": True})


@pytest.mark.cuda
@gpu
def test_matches_existing_kernel():
    from runtime.kernels.int_gemv import int_gemv
    N, K, M = 4096, 4096, 16
    x, t, ref = _inputs(N, K, M, torch.bfloat16, seed=7)
    y0 = int_gemv(x, t, SPEC, N, K).float()
    y1 = G.launch(x, t, SPEC, N, K, G.cfg(64, 256, sk=4)).float()
    assert float((y1 - ref).norm()) <= 1.5 * float((y0 - ref).norm()) + 1e-3



def test_offered_to_the_tuner_unless_turned_off(monkeypatch):
    """The Gluon configs are offered for 4-bit bf16/fp16 only, unless EXA_GEMV_GLUON=0; they are
    never valid without the spec or under the interpreter, and are checked against a
    tensor-core config before the tuner may keep one (int_gemv._agrees_with_tc)."""
    from runtime.kernels import int_gemv as I
    monkeypatch.setenv("EXA_GEMV_GLUON", "0")
    assert not any(c.get("GLUON") for c in I.candidates(16, 4))
    monkeypatch.delenv("EXA_GEMV_GLUON", raising=False)
    got = [c for c in I.candidates(16, 4) if c.get("GLUON")]
    assert len(got) == (len(G.CONFIGS) if G.HAVE_GLUON else 0)
    assert not any(c.get("GLUON") for c in I.candidates(16, 8) + I.candidates(16, 4, torch.float32))
    for c in got:
        assert not I._valid(c, 16, 4096, 4096, 4, 128)                     # no spec: never
        assert I._valid(c, 16, 4096, 4096, 4, 128, SPEC) == (G.valid(c, 16, 4096, 4096, SPEC)
                                                             and not I.interpreting())


@pytest.mark.cuda
@gpu
def test_int_gemv_launches_a_gluon_config(monkeypatch):
    from runtime.kernels import int_gemv as I
    x, t, ref = _inputs(4096, 4096, 8, torch.bfloat16, seed=5)
    c = {**G.cfg(64, 256, sk=2), "GLUON": True}
    _check(I.launch(x, t, SPEC, 4096, 4096, c), ref, torch.bfloat16, 8, 4096)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("c", [G.cfg(64, 256, sk=4), G.cfg(128, 256, sk=2, st=4, xs=True),
                               G.cfg(64, sk=4, pf=2, bm=8)], ids=str)
def test_split_k_sums_in_kernel_deterministically(c):
    """Split K adds the partials in the kernel (splitk_gluon.finish_tile): the same bits on
    every run, the counters left zero, ragged N included."""
    from runtime.kernels.splitk import counters
    N, K, M = 4160, 4096, 5
    x, t, ref = _inputs(N, K, M, torch.bfloat16, seed=11)
    ys = [G.launch(x, t, SPEC, N, K, c) for _ in range(3)]
    _check(ys[0], ref, torch.bfloat16, M, N)
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert int(counters(x.device, 1).abs().sum()) == 0
