"""Pieces of hybrid execution: CPU matmul kernels, the ring's per-phase order, block costs."""
import pytest
import torch

from runtime.kernels import cpu_linear
from runtime.prefetch import Prefetcher, Source
from runtime.quant import module_for
from runtime.quant.spec import QuantSpec, spec_from_name

FAST = [QuantSpec("int", 4, 32, zero_mode="int"), QuantSpec("int", 4, 32, sym=True), QuantSpec("int", 4, 128),
        QuantSpec("int", 4, -1, zero_mode="int"), QuantSpec("int", 4, 96, zero_mode="int"),
        QuantSpec("int", 8, -1, sym=True)]
SLOW = [QuantSpec("int", 3, 32), QuantSpec("int", 2, 64), QuantSpec("int", 8, 32), spec_from_name("nf4"),
        spec_from_name("fp4", double_quant=True), spec_from_name("int8")]


def _weights(spec, N=96, K=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = module_for(spec)
    t = fmt.quantize(torch.randn(N, K, generator=g), spec)
    return t, fmt.dequantize(t, spec, N, K), torch.randn(3, 2, K, generator=g)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("spec", FAST, ids=lambda s: s.name)
def test_fast_kernels_dequantize_exactly_in_fp32(spec):
    N, K = 96, 384
    t, w, x = _weights(spec)
    prep = cpu_linear.prepare(spec, t, N, K, torch.float32)
    assert prep is not None and prep.kind == ("int4" if spec.bits == 4 else "int8")
    got = cpu_linear.linear(torch.eye(K), spec, t, N, K, prep)           # = W.T, value by value
    exact = spec.zero_mode != "min" or spec.sym                            # "min" rounds 8s + m once
    if exact:
        assert torch.equal(got.t(), w)
    else:
        torch.testing.assert_close(got.t(), w, rtol=2e-6, atol=2e-6)
    bias = torch.randn(N)
    y = cpu_linear.linear(x, spec, t, N, K, prep, bias=bias)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    nbytes = prep.weight.numel() * prep.weight.element_size() + prep.scales.numel() * prep.scales.element_size()
    assert cpu_linear.converted_nbytes(spec, N, K, torch.float32) == nbytes


@pytest.mark.parametrize("spec", FAST, ids=lambda s: s.name)
def test_fast_kernels_in_bf16_are_as_close_as_the_bf16_reference(spec):
    N, K = 96, 384
    t, w, x = _weights(spec)
    xb = x.bfloat16()
    prep = cpu_linear.prepare(spec, t, N, K, torch.bfloat16)
    assert prep.dtype == torch.bfloat16
    exact = xb.float() @ w.t()
    got = cpu_linear.linear(xb, spec, t, N, K, prep)
    assert got.dtype == torch.bfloat16
    ref = module_for(spec).linear(xb, t, spec, N, K)                       # dequantize to bf16 + F.linear
    assert _rel(got, exact) < 2 * _rel(ref, exact) + 1e-3
    half = cpu_linear.linear(x.half(), spec, t, N, K, cpu_linear.prepare(spec, t, N, K, torch.float16))
    assert half.dtype == torch.float16 and _rel(half, exact) < 1e-2


@pytest.mark.parametrize("spec", SLOW, ids=lambda s: s.name)
def test_other_formats_use_the_reference_in_row_slices(spec, monkeypatch):
    N, K = 96, 384
    t, w, x = _weights(spec)
    assert cpu_linear.prepare(spec, t, N, K, torch.float32) is None
    assert cpu_linear.converted_nbytes(spec, N, K, torch.bfloat16) == 0
    whole = module_for(spec).linear(x, t, spec, N, K)
    monkeypatch.setattr(cpu_linear, "_FALLBACK_ELEMS", 40 * K)             # slices of 40 rows
    torch.testing.assert_close(cpu_linear.linear(x, spec, t, N, K), whole, rtol=1e-5, atol=1e-4)  # sum order


def test_act_order_permutation_and_shapes_without_a_kernel():
    spec, N, K = QuantSpec("int", 4, 32, zero_mode="int"), 64, 128
    t, w, x = _weights(spec, N, K)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    prep = cpu_linear.prepare(spec, t, N, K, torch.float32)
    y = cpu_linear.linear(x, spec, t, N, K, prep, perm=perm)
    torch.testing.assert_close(y, x[..., perm.long()] @ w.t(), rtol=1e-5, atol=1e-5)
    assert cpu_linear.kernel_kind(spec, 40, K) is None                     # N % 16 != 0
    assert cpu_linear.kernel_kind(QuantSpec("int", 4, 16), N, K) is None    # no torch group of 16
    assert cpu_linear.int4_supported()


# -- the ring's order per phase --------------------------------------------------------------
def _ring(nslots=3, names="abcd"):
    sources = {n: Source("cpu", 4096, host=torch.full((4096,), i + 1, dtype=torch.uint8))
               for i, n in enumerate(names)}
    return Prefetcher(list(names), sources, nslots, torch.device("cpu"))


def _pass(pre, names):
    for n in names:
        assert int(pre.acquire(n)[0]) == "abcd".index(n) + 1, n     # the slot holds that block
        pre.release(n)


def test_set_order_keeps_blocks_in_flight_when_they_still_come_first():
    pre = _ring()
    _pass(pre, "abcd")
    assert [n for n, _, _ in pre.pending] == list("abc")
    pre.set_order(list("abc"))                    # d computed elsewhere: a, b, c stay in flight
    assert [n for n, _, _ in pre.pending] == list("abc") and pre.cursor == 0
    _pass(pre, "abc")
    _pass(pre, "abc")
    pre.set_order(list("abcd"))
    _pass(pre, "abcd")


def test_set_order_drains_when_the_next_blocks_differ_and_allows_an_empty_phase():
    pre = _ring()
    _pass(pre, "abcd")
    pre.set_order(list("bd"))                     # a, b, c in flight, but b comes first now
    assert not pre.pending and pre.cursor == 0
    _pass(pre, "bd")
    _pass(pre, "bd")
    pre.set_order([])                              # every streamed block computed on the CPU
    with pytest.raises(RuntimeError, match="streams nothing"):
        pre.acquire("a")
    pre.set_order(list("abcd"))
    _pass(pre, "abcd")
    _pass(pre, "abcd")
    with pytest.raises(ValueError, match="no source"):
        pre.set_order(["x"])
    pre.acquire("a")
    with pytest.raises(RuntimeError, match="during a pass"):
        pre.set_order(list("ab"))


def test_set_order_with_fewer_blocks_than_slots():
    pre = _ring(nslots=3)
    _pass(pre, "abcd")
    pre.set_order(["a"])                            # in flight a, b, c != a, a, a: drained
    for _ in range(3):
        _pass(pre, "a")
    pre.set_order(list("abcd"))                     # in flight a, a, a: drained again
    _pass(pre, "abcd")


# -- what a block costs on the CPU -----------------------------------------------------------
def test_block_costs_of_a_tiny_llama(tiny_models):
    from runtime.config import load_config
    from runtime.engine import plan_model
    from runtime.hybrid import block_costs
    config = load_config(str(tiny_models("llama")))
    spec = QuantSpec("int", 4, 32)
    planned = plan_model(config, device=torch.device("cpu"), dtype=torch.bfloat16, quant=spec, offload="none")
    layer = next(b for b in planned.blocks if b.name == "layers.0")
    extra, small, ok = block_costs(layer, torch.bfloat16)
    # q 64x64, k/v 32x64, o 64x64, gate/up 96x64, down 64x96; two norms of 64 bf16
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (96, 64), (96, 64), (64, 96)]
    assert extra == sum(cpu_linear.converted_nbytes(spec, n, k, torch.bfloat16) for n, k in shapes)
    assert small == 2 * 64 * 2 and ok
    spec_by_name = {b.name: b for b in planned.placement.blocks}
    assert spec_by_name["layers.0"].cpu_extra == extra and not block_costs(planned.blocks[0], torch.bfloat16)[2]
