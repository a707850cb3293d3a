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
    ref = torch.nn.functional.linear(x.double(), w.double(), bias.double())
    # fp32 summation of K products, in whatever order the kernel takes: |error| <= K * eps * sum|x*w|
    bound = K * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().t() + bias.abs().double())
    assert ((y.double() - ref).abs() <= bound).all()
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


# -- int4 conversion: torch's packing built directly from exa's packed bytes ------------------
def _layout_reference(q, K, bn, halves):
    """The packing as torch's weight_to_int4pack_kernel documents it, code by code."""
    codes = torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], K)          # [N, K]
    parts = []
    for b0 in range(0, q.shape[0], bn):
        blk = codes[b0:b0 + bn]
        nb = blk.shape[0]
        a, b = (blk[: nb // 2], blk[nb // 2:]) if halves and nb == bn else (blk[0::2], blk[1::2])
        parts.append((a | (b << 4)).t().reshape(-1))                                # [K, nb/2]
    return torch.cat(parts).view(q.shape[0], K // 2)


@pytest.mark.parametrize("N", [16, 48, 64, 80, 208, 1072])
@pytest.mark.parametrize("K", [32, 96, 512])
def test_direct_int4_packing_is_torchs_op_byte_for_byte(N, K, monkeypatch):
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(N + K))
    want = cpu_linear._torch_pack(q, K)
    assert cpu_linear._int4_layout() is not None                          # x86 / ARM torch builds
    assert torch.equal(cpu_linear._int4_weight(q, K), want)
    monkeypatch.setattr(cpu_linear, "_CONVERT_BYTES", 1)                   # one block at a time
    assert torch.equal(cpu_linear._int4_weight(q, K), want)
    odd = torch.empty(q.numel() + 1, dtype=torch.uint8)[1:].view_as(q).copy_(q)   # not word-aligned
    assert torch.equal(cpu_linear._int4_weight(odd, K), want)
    for lay in [(64, True), (32, True), (16, True), (16, False), (32, False)]:   # other CPUs' layouts
        assert torch.equal(cpu_linear._direct_pack(q, K, *lay), _layout_reference(q, K, *lay)), lay


def _scales_reference(spec, t, K, gs, dtype):
    s = t["scales"].float()
    zero = (torch.zeros_like(s) if spec.sym else (8.0 - t["zeros"].float()) * s if spec.zero_mode == "int"
            else 8.0 * s + t["mins"].float())
    idx = torch.arange(K // gs) * gs // (K if spec.group_size == -1 else spec.group_size)
    return torch.stack([s[:, idx], zero[:, idx]], dim=-1).transpose(0, 1).contiguous().to(dtype)


MODES = [dict(zero_mode="int"), dict(zero_mode="min"), dict(sym=True)]


@pytest.mark.parametrize("group", [32, 64, 128, 256, -1, 96])
@pytest.mark.parametrize("mode", MODES, ids=["int", "min", "sym"])
def test_prepare_int4_is_byte_exact_against_torchs_op(group, mode, monkeypatch):
    spec, N, K = QuantSpec("int", 4, group, **mode), 208, 768 if group != 96 else 352   # 352: short last group
    t, w, _ = _weights(spec, N, K)
    for dtype in (torch.float32, torch.bfloat16):
        prep = cpu_linear.prepare(spec, t, N, K, dtype)
        gs = prep.group
        assert torch.equal(prep.weight, cpu_linear._torch_pack(t["qweight"], K))
        ref = _scales_reference(spec, t, K, gs, prep.dtype)
        assert prep.scales.shape == ref.shape and torch.equal(prep.scales, ref)
        assert prep.scales.is_contiguous() and prep.scales.untyped_storage().nbytes() == ref.numel() * ref.element_size()
        monkeypatch.setattr(cpu_linear, "_int4_layout", lambda: None)     # torch's op: the fallback
        assert torch.equal(cpu_linear.prepare(spec, t, N, K, dtype).weight, prep.weight)
        monkeypatch.undo()
    got = cpu_linear.linear(torch.eye(K), spec, t, N, K, cpu_linear.prepare(spec, t, N, K, torch.float32))
    torch.testing.assert_close(got.t(), w, rtol=2e-6, atol=2e-6)


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
    assert spec_by_name["layers.0"].cpu_extra == extra
    assert block_costs(planned.blocks[0], torch.bfloat16) == (0, 0, True)     # embed: a host lookup
    assert not block_costs(planned.blocks[-1], torch.bfloat16)[2]             # head: never
