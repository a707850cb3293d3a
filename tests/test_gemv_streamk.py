"""Stream-K for the Gluon GEMV (runtime/kernels/int_gemv_streamk.py): the partition (CPU) and the
kernel against the reference, bit-for-bit repeatable (GPU, marker ``cuda``)."""
from __future__ import annotations

import pytest
import torch

from interp import enable_interpreter

INTERP_OK = (not torch.cuda.is_available()) and enable_interpreter()   # before triton is imported compiled
from runtime.kernels import int_gemv_gluon as G  # noqa: E402
from runtime.kernels import int_gemv_streamk as SK  # noqa: E402
from runtime.quant import intq  # noqa: E402
from runtime.quant.spec import QuantSpec  # noqa: E402

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


@pytest.mark.parametrize("U,P", [(1, 1), (7, 3), (12, 12), (528, 264), (626, 264), (14336, 396),
                                 (1000, 999)])
def test_owner_is_the_program_holding_the_unit(U, P):
    for u in range(U):
        p = SK.owner(u, U, P)
        assert p * U // P <= u < (p + 1) * U // P


@pytest.mark.parametrize("T,S,P", [(3, 4, 12), (33, 16, 264), (313, 2, 264), (224, 32, 396)])
def test_split_tiles_have_one_slot_per_program(T, S, P):
    """What the kernel's writers and the last reader of a tile agree on: every program of a
    split tile writes one slot (0 if it started in that tile, else 1), and a program's two
    slots never hold two tiles' partials at once (slot 0: its first tile, 1: its last)."""
    U = T * S
    used = {}
    for t in range(T):
        first, last = SK.owner(t * S, U, P), SK.owner(t * S + S - 1, U, P)
        if first == last:
            continue
        for q in range(first, last + 1):
            slot = int((q * U // P) // S != t)
            assert (q, slot) not in used, (q, slot, t, used.get((q, slot)))
            used[(q, slot)] = t
            start = max(q * U // P, t * S)
            assert start // S == t and (slot == 0) == (q * U // P >= t * S)


def test_stream_configs_need_a_ring_or_pf_and_no_split():
    ok = lambda c: G.valid(c, 8, 4096, 4096, SPEC)   # noqa: E731
    assert ok(G.cfg(128, 256, st=4, bm=8, xs=True, ctas=2))
    assert ok(G.cfg(128, pf=2, bm=8, ctas=2)) and ok(G.cfg(128, pf=3, xl=True, ctas=2))
    assert not ok(G.cfg(128, 256, sk=2, st=4, bm=8, xs=True, ctas=2))
    assert not ok(G.cfg(128, sk=2, pf=2, ctas=2))
    assert not ok(G.cfg(128, 256, bm=8, ctas=2))


def _inputs(N, K, M, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    t = intq.quantize(torch.randn(N, K, device="cuda", generator=g) * 0.05, SPEC)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    return x, t, x.float() @ intq.dequantize(t, SPEC, N, K).T


@pytest.mark.cuda
@pytest.mark.skipif(not G.HAVE_GLUON, reason="triton.experimental.gluon missing")
@pytest.mark.parametrize("c", [G.cfg(128, 256, st=4, bm=8, xs=True, ctas=2),
                               G.cfg(128, 256, st=4, bm=16, xs=True, ctas=3),
                               G.cfg(128, pf=2, ctas=2), G.cfg(128, pf=3, xl=True, ctas=2),
                               G.cfg(128, pf=3, bm=8, ctas=2),
                               G.cfg(64, pf=2, bm=8, ctas=3, ev=True)], ids=str)
@pytest.mark.parametrize("N,K,M", [(300, 1024, 7), (4160, 4096, 5), (40000, 512, 8),
                                   (28672, 8192, 4), (8192, 28672, 16)])
def test_streamk_matches_reference_and_repeats(N, K, M, c):
    """Ring (ST) and PF configs, tiles split over 1-3 programs or not at all."""
    from runtime.kernels.splitk import counters
    if not G.valid(c, M, N, K, SPEC):
        pytest.skip("M above the config's BLOCK_M")
    x, t, ref = _inputs(N, K, M, seed=N + M)
    ys = [G.launch(x, t, SPEC, N, K, c) for _ in range(3)]
    y = ys[0].float()
    assert ys[0].shape == (M, N) and bool(torch.isfinite(y).all())
    assert float((y - ref).norm() / ref.norm()) < 8e-3
    assert float((y - ref).abs().max()) <= 4 * (2 ** -7 * float(ref.abs().max()) + 1e-3)
    assert all(torch.equal(ys[0], y2) for y2 in ys[1:])               # fixed-order sums
    assert int(counters(x.device, 1).abs().sum()) == 0                # every counter reset
    plain = G.launch(x, t, SPEC, N, K, {k: v for k, v in c.items() if k != "CTAS"}).float()
    assert float((y - plain).norm() / plain.norm()) < 8e-3
