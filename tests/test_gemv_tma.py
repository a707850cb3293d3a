"""The TMA-ring, warp-specialized decode GEMV (runtime/kernels/int_gemv_tma.py): its config
rules on any machine; on an sm_90 GPU every config against the reference and bit for bit
against the cp.async wgmma kernel it reorganises (same products, same order of sums)."""
import pytest
import torch

from gluon_cases import group_scaled_case
from runtime.kernels import int_gemm_gluon as W
from runtime.kernels import int_gemv_tma as T
from runtime.quant import intq
from runtime.quant.spec import QuantSpec

SPEC = QuantSpec("int", 4, 128, zero_mode="int")


def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_config_rules():
    c = T.cfg(64, 16, 3, 4, 2)
    assert T.valid(c, 16, 4096, 8192, SPEC) and T.valid(c, 1, 4096, 8192, SPEC)
    assert not T.valid(c, 17, 4096, 8192, SPEC)            # one M tile of at most 16 rows
    assert not T.valid(c, 16, 32, 8192, SPEC)              # N below one row block
    assert not T.valid({**c, "ST": 1}, 16, 4096, 8192, SPEC)
    assert not T.valid(c, 16, 4096, 8192 + 128, SPEC)      # K not a multiple of 2 x 128
    assert all(c["RG"] * 32 * (c["num_warps"] + 4) <= 65536 for c in T.CONFIGS)


@pytest.mark.cuda
@pytest.mark.skipif(not (T.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
@pytest.mark.parametrize("c", T.CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("K", [1024, 4096])
def test_configs(c, K):
    N, M = 1000, min(13, c["BLOCK_M"])                     # ragged N: TMA fills past-the-end rows
    t, x, ref = group_scaled_case(N, K, M, SPEC, K)
    y = T.launch(x, t, SPEC, N, K, c)
    assert y.shape == (M, N) and float((y.float() - ref).norm() / ref.norm()) < 1e-2
    if c.get("NK"):                                    # natural K: the sums run in another order
        twin = T.launch(x, t, SPEC, N, K, {k: v for k, v in c.items() if k != "NK"})
        assert float((y.float() - twin.float()).norm() / twin.float().norm()) < 5e-3
    else:
        assert torch.equal(y, W.launch(x, t, SPEC, N, K, T.ring_twin(c)))
    assert torch.equal(y, T.launch(x, t, SPEC, N, K, c))  # run to run


@pytest.mark.cuda
@pytest.mark.skipif(not (T.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_natural_order_unpacks_every_code_exactly(dt):
    """NK: with x one-hot in K (row m of x = e_k, k = 16 p + m), out[m, n] is (q - z) s of
    weight (n, k) alone, so every code of every word position, every lane's pair and both halves
    is checked against the dequantized weight, for bf16 and fp16."""
    N, K, M = 64, 1024, 16
    t = intq.quantize(torch.randn(N, K, device="cuda") * 0.05, SPEC)
    wd = intq.dequantize(t, SPEC, N, K)
    c = T.cfg(64, 16, 3, 4, 1, nk=True)
    for p in range(K // M):                           # every k once: k = 16 p + m
        ks = [M * p + m for m in range(M)]
        x = torch.zeros(M, K, device="cuda", dtype=dt)
        x[torch.arange(M), ks] = 1
        y = T.launch(x, t, SPEC, N, K, c).float()
        assert torch.equal(y, wd[:, ks].T.to(dt).float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_permute_k_equals_the_reference_on_the_gpu():
    from runtime.kernels.k_order import permute_k
    for M, K in ((1, 128), (13, 8192), (16, 28672)):
        x = torch.randn(M, 2 * K, device="cuda").bfloat16()[:, K:]           # a strided view
        assert torch.equal(permute_k(x), W.permute_x_ref(x))


@pytest.mark.cuda
@pytest.mark.skipif(not (T.HAVE_GLUON and _sm90()), reason="needs gluon and an sm_90 GPU")
def test_int_gemv_tunes_with_the_tma_configs(tmp_path, monkeypatch):
    """int_gemv's tuner at M = 5-16 times the TMA configs (on by default) and its pick, whichever
    it is, matches the reference; EXA_GEMV_TMA=0 leaves them out."""
    from runtime.kernels import int_gemv as V
    x = torch.zeros(16, 64, device="cuda", dtype=torch.bfloat16)
    assert V.tma_on(x)
    monkeypatch.setenv("EXA_GEMV_TMA", "0")
    assert not V.tma_on(x)
    monkeypatch.delenv("EXA_GEMV_TMA")
    assert sum(1 for c in V.candidates(16, 4, tma=True) if c.get("TMA")) == len(T.DECODE)
    assert sum(1 for c in V.candidates(8, 4, tma=True) if c.get("TMA")) == len(T.DECODE8)
    assert not any(c.get("TMA") for c in V.candidates(4, 4, tma=True) + V.candidates(16, 8, tma=True))
    assert all(c in T.CONFIGS for c in T.DECODE + T.DECODE8)
    monkeypatch.setenv("EXA_CACHE_DIR", str(tmp_path))
    N, K = 4096, 4096
    t = intq.quantize(torch.randn(N, K, device="cuda") * 0.05, SPEC)
    for M, offered in ((12, T.DECODE), (7, T.DECODE8)):
        monkeypatch.setattr(V.TUNER, "cache", {})
        monkeypatch.setattr(V.TUNER, "timings", {})
        x = torch.randn(M, K, device="cuda").bfloat16()
        y = V.int_gemv(x, t, SPEC, N, K)
        ref = x.float() @ intq.dequantize(t, SPEC, N, K).T
        assert float((y.float() - ref).norm() / ref.norm()) < 1e-2
        (timed,) = V.TUNER.timings.values()
        assert sum(1 for c, _ in timed if c.get("TMA")) == len(offered)
