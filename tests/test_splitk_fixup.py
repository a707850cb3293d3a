"""Split-K partial sums finished in the kernel (runtime/kernels/splitk.py, FIXUP configs of the
CUDA-core int GEMV) against the reference and against the unfused sum.

On CPU through Triton's interpreter (programs run one after another, so the last to arrive is
the last of the tile's split); on a GPU (``cuda``) the programs race for real. Either way the
output must match the reference, be bit-identical from run to run, and leave every tile
counter at 0.
"""
from __future__ import annotations

import pytest
import torch

from interp import enable_interpreter, kernel_fixtures
from runtime.kernels import reference as R
from runtime.quant.spec import QuantSpec

CUDA = torch.cuda.is_available()
INTERP_OK = (not CUDA) and enable_interpreter()
interp_only = pytest.mark.skipif(not INTERP_OK, reason="CPU interpreter tests")
K, _interpret_env = kernel_fixtures(INTERP_OK)
SPEC = QuantSpec("int", 4, 128, sym=False, zero_mode="int")


def _run(mod, S, x, t, N, Kd, cfg):
    mod.TUNER.override = [cfg]
    mod.TUNER.cache.clear()
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype, device=x.device)
    return mod.int_gemv(x, t, SPEC, N, Kd, out=out).clone()


def _case(device, M, N, Kd, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    t = R.random_quantized(SPEC, N, Kd, device=device, generator=g)
    x = torch.randn(M, Kd, generator=g, device=device).to(torch.bfloat16)
    return t, x, R.ref_linear(x.float(), t, SPEC, N, Kd)


def _check(mod, S, spk, device, cfgs, M, N, Kd):
    t, x, ref = _case(device, M, N, Kd)
    for plain, fused in cfgs:
        a = _run(mod, S, x, t, N, Kd, plain)
        b = _run(mod, S, x, t, N, Kd, fused)
        b2 = _run(mod, S, x, t, N, Kd, fused)
        for y in (a, b):
            err = float((y.float() - ref).norm() / ref.norm())
            assert torch.isfinite(y).all() and err < 1.5e-2, (fused, err)
        assert torch.equal(b, b2), "fused split-K sum differs between runs"
        assert (b.float() - a.float()).abs().max() <= 1e-2 * ref.abs().max()
        assert int(spk.counters(x.device, 1).abs().sum()) == 0, "tile counters not reset"


@interp_only
@pytest.mark.parametrize("M", [1, 3])
def test_fused_split_k_interpreted(K, M):
    S = K.int_gemv_simt
    bm = 1 if M == 1 else 4
    kw = {} if M == 1 else {"join": 1}
    cfgs = [(S.simt_cfg(32, 128, sk=sk, bm=bm, **kw), S.simt_cfg(32, 128, sk=sk, bm=bm, fix=1, **kw))
            for sk in (2, 4)]
    _check(K.int_gemv, S, K.splitk, "cpu", cfgs, M, 72, 512)


def test_every_split_candidate_has_a_fused_twin():
    from runtime.kernels.int_gemv_simt import simt_candidates
    for mb in (1, 2, 4):
        cands = simt_candidates(mb, 4)
        split = [c for c in cands if c["SPLIT_K"] > 1 and not c["FIXUP"]]
        assert split and all({**c, "FIXUP": 1} in cands for c in split)
        assert not any(c["FIXUP"] and c["SPLIT_K"] == 1 for c in cands)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 2, 4])
def test_fused_split_k_cuda(M):
    from runtime.kernels import int_gemv, int_gemv_simt as S, splitk
    kw = {} if M == 1 else {"join": 1}
    cfgs = [(S.simt_cfg(64, 256, sk=sk, bm=M, **kw), S.simt_cfg(64, 256, sk=sk, bm=M, fix=1, **kw))
            for sk in (2, 4, 8)]
    try:
        _check(int_gemv, S, splitk, "cuda", cfgs, M, 4000, 8192)
    finally:
        int_gemv.TUNER.override = None
        int_gemv.TUNER.cache.clear()


NF4 = QuantSpec("nf4", 4, 64, double_quant=True)


def _check_nf4(mod, S, spk, device, M, N, Kd, sks, bn, bk):
    g = torch.Generator(device=device).manual_seed(M)
    t = R.random_quantized(NF4, N, Kd, device=device, generator=g)
    x = torch.randn(M, Kd, generator=g, device=device).to(torch.bfloat16)
    ref = R.ref_linear(x.float(), t, NF4, N, Kd)
    bm = 1 if M == 1 else 2 if M == 2 else 4
    for sk in sks:
        ys = []
        for fix in (0, 1, 1):
            mod.TUNER.override = [S.simt_cfg(bn, bk, sk, 4, bm, False, fix=fix)]
            mod.TUNER.cache.clear()
            out = torch.full((M, N), float("nan"), dtype=x.dtype, device=device)
            ys.append(mod.nf4_gemv(x, t, NF4, N, Kd, out=out).clone())
        for y in ys:
            err = float((y.float() - ref).norm() / ref.norm())
            assert torch.isfinite(y).all() and err < 1.5e-2, (sk, err)
        assert torch.equal(ys[1], ys[2]), "fused split-K sum differs between runs"
        assert int(spk.counters(x.device, 1).abs().sum()) == 0


@interp_only
@pytest.mark.parametrize("M", [1, 2, 3])
def test_fused_split_k_nf4_interpreted(K, M):
    _check_nf4(K.nf4_gemv, K.nf4_gemv_simt, K.splitk, "cpu", M, 40, 512, (2,), 16, 128)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 2, 4])
def test_fused_split_k_nf4_cuda(M):
    from runtime.kernels import nf4_gemv, nf4_gemv_simt as S, splitk
    try:
        _check_nf4(nf4_gemv, S, splitk, "cuda", M, 4000, 8192, (2, 4, 8), 64, 256)
    finally:
        nf4_gemv.TUNER.override = None
        nf4_gemv.TUNER.cache.clear()


def test_fused_counters_only_for_fused_split_configs():
    from runtime.kernels.splitk import fused_counters
    cpu = torch.device("cpu")
    assert fused_counters({"SPLIT_K": 1, "FIXUP": 1}, cpu, 4) is None
    assert fused_counters({"SPLIT_K": 4, "FIXUP": 0}, cpu, 4) is None
    c = fused_counters({"SPLIT_K": 4, "FIXUP": 1}, cpu, 5000)
    assert c is not None and c.numel() >= 5000 and c.dtype == torch.int32 and not c.any()
