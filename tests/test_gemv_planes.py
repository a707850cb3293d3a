"""The tensor-core int GEMV with one dot per code plane (``int_gemv_planes``, an ``int_gemv``
candidate) against the plain-torch reference, through Triton's CPU interpreter (tests/interp.py).

Fresh random inputs, seeded per case; outputs poisoned with NaN first (an unwritten element
fails). Tests marked ``cuda`` run the compiled kernel.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from interp import kernel_fixtures
from runtime.kernels import reference as R
from test_simt_m import DTYPES, INTERP_OK, TOL, _check, _gen, _spec

interp_only = pytest.mark.skipif(not INTERP_OK, reason="CPU interpreter tests")
K, _interpret_env = kernel_fixtures(INTERP_OK)
# (bits, group): the dots are 16 words deep, i.e. 16 * 32 / bits columns inside one group
FORMATS = [(2, -1), (4, 128), (4, -1), (8, 64), (8, 128), (8, -1)]
CASES = list(itertools.product(FORMATS, ("sym", "int", "min")))


@interp_only
@pytest.mark.parametrize("fmt,mode", CASES, ids=lambda v: str(v))
def test_planes_every_format(K, fmt, mode):
    """2/4/8 bits, every zero mode, M = 1..16 under BLOCK_M 16, bf16 / fp16 / fp32, split K
    1 / 2, a partial row tile."""
    bits, group = fmt
    i = CASES.index((fmt, mode))
    M, dtype = (1, 5, 16, 3)[i % 4], DTYPES[i % 3]
    N, bk = (40, 64, 80)[i % 3], 16 * 32 // bits
    Kd = 2 * bk if group == -1 or group == bk else 2 * group
    split = 1 + (i % 2)
    cfg = K.int_gemv_planes.planes_cfg(32 if i % 2 else 64, bk, sk=split)
    spec = _spec(bits, group, mode)
    assert K.int_gemv_planes.planes_valid(cfg, M, Kd, bits, Kd if group == -1 else group)
    g = _gen("planes", bits, group, mode)
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    _check(K.int_gemv, cfg, x, t, spec, N, Kd, TOL[dtype])


@interp_only
def test_planes_candidates_and_validity(K, monkeypatch):
    """Candidates for 2/4/8 bits only, from M = 2 (M = 1 stays with the CUDA cores and the other
    tensor-core kernel), offered only with EXA_GEMV_PLANES=1; a dot less than 16 words deep, a
    step across groups or a K that the split does not divide is refused."""
    P, G = K.int_gemv_planes, K.int_gemv
    assert P.planes_candidates(3) == [] and P.planes_candidates(4)
    monkeypatch.delenv("EXA_GEMV_PLANES", raising=False)
    assert not any(c.get("PLANES") for c in G.candidates(16, 4))
    monkeypatch.setenv("EXA_GEMV_PLANES", "1")
    assert not any(c.get("PLANES") for c in G.candidates(1, 4))
    assert any(c.get("PLANES") for c in G.candidates(16, 4))
    for c in P.planes_candidates(4):
        assert P.planes_valid(c, 16, 8192, 4, 128) and P.planes_valid(c, 16, 28672, 4, 128)
    c = P.planes_cfg(64, 128, sk=2)
    assert not P.planes_valid(c, 16, 8192, 4, 64)          # 128 columns span two groups of 64
    assert not P.planes_valid(P.planes_cfg(64, 64), 16, 8192, 4, 128)     # 8 words deep
    assert not P.planes_valid(c, 16, 128 * 3, 4, 128)      # split 2 does not divide 3 steps
    assert not P.planes_valid(c, 17, 8192, 4, 128)         # M above BLOCK_M


@pytest.mark.cuda
@pytest.mark.parametrize("fmt,mode", CASES[::2], ids=lambda v: str(v))
def test_gpu_planes(fmt, mode):
    """The compiled kernel, M = 3, 8, 16, bf16 and fp16, split K 1 and 4."""
    from runtime.kernels import int_gemv
    from runtime.kernels.int_gemv_planes import planes_cfg
    bits, group = fmt
    spec = _spec(bits, group, mode)
    g = torch.Generator(device="cuda").manual_seed(bits)
    N, Kd = 512, 2048
    t = R.random_quantized(spec, N, Kd, device="cuda", generator=g)
    saved = int_gemv.TUNER.override, dict(int_gemv.TUNER.cache)
    try:
        for M, sk, dtype in ((3, 1, torch.bfloat16), (8, 4, torch.float16), (16, 4, torch.bfloat16)):
            x = torch.randn(M, Kd, device="cuda", generator=g).to(dtype)
            int_gemv.TUNER.override, int_gemv.TUNER.cache = [planes_cfg(64, 16 * 32 // bits, sk)], {}
            y = int_gemv.int_gemv(x, t, spec, N, Kd)
            ref = x.float() @ R.dequant(t, spec, N, Kd, torch.float32).T
            err = float((y.float() - ref).norm() / ref.norm())
            tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
            assert err < tol, f"{spec.name} M={M}: {err:.2e}"
    finally:
        int_gemv.TUNER.override, int_gemv.TUNER.cache = saved


@interp_only
def test_the_tuner_uses_a_planes_config_only_where_it_agrees(K, monkeypatch):
    """int_gemv's tuner check: a PLANES config passes when its output matches the first valid
    tensor-core config's, fails when it does not (here: a sabotaged launch); others pass."""
    G = K.int_gemv
    spec, N, Kd, M = _spec(4, 128, "int"), 64, 256, 5
    g = _gen("planes-check")
    t = R.random_quantized(spec, N, Kd, generator=g)
    x = torch.randn(M, Kd, generator=g)
    out = torch.empty(M, N)
    cands = [G._cfg(32, 128), K.int_gemv_planes.planes_cfg(32, 128)]
    check = G._agrees_with_tc(x, t, spec, N, Kd, 128, 8, lambda: cands, out)
    assert check(cands[0]) and check(cands[1])
    real = G.planes_launch

    def sabotaged(x, qw, s, z, dst, *a, **kw):
        real(x, qw, s, z, dst, *a, **kw)
        dst[:, : N // 2] *= -1
    monkeypatch.setattr(G, "planes_launch", sabotaged)
    assert not G._agrees_with_tc(x, t, spec, N, Kd, 128, 8, lambda: cands, out)(cands[1])


def test_tuner_skips_configs_its_check_rejects(monkeypatch, tmp_path):
    """Tuner.pick on a GPU: the fastest config is not picked when check rejects it (warned);
    without check it is."""
    from runtime.kernels import tuning
    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    calls = []

    def fake_time(run, fits_l2=False):
        calls.append(run())
        return times[calls[-1]]
    monkeypatch.setattr(tuning, "_time", fake_time)
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    cands = [{"n": "a"}, {"n": "b"}, {"n": "c"}]
    tuner = tuning.Tuner("t")
    tuner.override = None
    with pytest.warns(UserWarning, match="disagrees"):
        cfg = tuner.pick(("k",), cands, lambda c: True, lambda c: c["n"], True, check=lambda c: c["n"] != "b")
    assert cfg == {"n": "c"} and "b" not in calls
    assert tuning.Tuner("u").pick(("k",), cands, lambda c: True, lambda c: c["n"], True) == {"n": "b"}
    assert (tmp_path / "tuning.json").is_file()                        # picks made on a "GPU" are kept
