"""Quantization formats (runtime/quant): packing, RTN error, exact grids, QuantLinear, int8, bnb."""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.quant import QuantLinear, QuantSpec, bnb4, int8, intq, module_for, swap_linears

INT_SPECS = [QuantSpec("int", bits=b, group_size=g, sym=sym, zero_mode=zm)
             for b in (2, 3, 4, 8) for g in (32, 64, 128, -1)
             for sym, zm in ((True, "min"), (False, "int"), (False, "min"))]
BNB_SPECS = [QuantSpec(f, 4, 64, double_quant=dq) for f in ("nf4", "fp4") for dq in (False, True)]
INT8_SPEC = QuantSpec("int8", 8, threshold=6.0)
ALL_SPECS = INT_SPECS + BNB_SPECS + [INT8_SPEC]
N, K = 72, 256                     # 72*256/64 = 288 absmax values: two double-quant runs


def _ids(specs):
    return [s.name for s in specs]


def _weights(n=N, k=K, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp(0.5 * torch.randn(n, 1, generator=g))
    return (torch.randn(n, k, generator=g) * rows + 0.1 * torch.randn(n, 1, generator=g)).to(dtype)


def _group(spec, k=K):
    return k if spec.group_size == -1 else spec.group_size


# ------------------------------------------------------------------ shapes and bad input

@pytest.mark.parametrize("spec", ALL_SPECS, ids=_ids(ALL_SPECS))
def test_quantize_returns_packed_shapes(spec):
    fmt = module_for(spec)
    t = fmt.quantize(_weights(), spec)
    shapes = fmt.packed_shapes(spec, N, K)
    assert list(t) == list(shapes)
    for name, (shape, dtype) in shapes.items():
        assert (tuple(t[name].shape), t[name].dtype) == (shape, dtype), name


@pytest.mark.parametrize("mode", [dict(sym=True), dict(zero_mode="int"), dict(zero_mode="min")])
def test_int_groups_may_end_short(mode):
    """K = 576 with group 128 (SmolLM2's hidden size): 5 groups, the last one 64 wide."""
    spec = QuantSpec("int", 4, 128, **mode)
    shapes = intq.packed_shapes(spec, 8, 576)
    assert shapes["scales"][0] == (8, 5)
    w = _weights(8, 576)
    t = intq.quantize(w, spec)
    d = intq.dequantize(t, spec, 8, 576)
    for gi in range(5):                                 # each group's error <= half its step
        cols = slice(gi * 128, min(576, gi * 128 + 128))
        step = t["scales"][:, gi].float()[:, None]
        assert bool(((d[:, cols] - w[:, cols]).abs() <= step / 2 + 1e-3 * step + 1e-6).all())
    assert torch.equal(intq.dequantize(intq.quantize(d, spec), spec, 8, 576), d)   # on-grid: exact


def test_bad_shapes_and_inputs_raise_clearly():
    with pytest.raises(ValueError, match="multiple of 8"):
        intq.packed_shapes(QuantSpec("int", 3, -1), 8, 12)
    with pytest.raises(ValueError, match="not divisible by group_size 64"):
        bnb4.packed_shapes(QuantSpec("nf4", 4, 64), 8, 96)
    with pytest.raises(ValueError, match="intq handles"):
        intq.packed_shapes(QuantSpec("nf4", 4, 64), 8, 64)
    spec = QuantSpec("int", 4, 64)
    t = intq.quantize(_weights(8, 64), spec)
    t["scales"] = t["scales"][:, :0]
    with pytest.raises(ValueError, match="'scales'"):
        intq.dequantize(t, spec, 8, 64)
    w = _weights(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        intq.quantize(w, spec)


# ------------------------------------------------------------------ bit layouts, exact bytes

def test_int_packing_known_bytes():
    q4 = torch.tensor([[1, 2, 3, 4, 15, 0, 0, 15]], dtype=torch.uint8)
    assert intq.pack_codes(q4, 4).tolist() == [[0x21, 0x43, 0x0F, 0xF0]]       # low nibble = even k
    q2 = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    assert intq.pack_codes(q2, 2).tolist() == [[0xE4, 0x1B]]                   # code k at bit 2*(k%4)
    q3 = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 7, 7, 0, 0, 0, 0]], dtype=torch.uint8)
    # low-2-bit plane (K/4 bytes) then high-bit plane (K/8 bytes, code k at bit k%8)
    assert intq.pack_codes(q3, 3).tolist() == [[0xE4, 0xE4, 0xFF, 0x00, 0xF0, 0x0F]]
    q8 = torch.tensor([[0, 7, 128, 255]], dtype=torch.uint8)
    assert intq.pack_codes(q8, 8).tolist() == q8.tolist()
    assert bnb4.pack_nibbles(torch.tensor([1, 2, 3, 4])).tolist() == [0x12, 0x34]  # first = high


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_pack_unpack_roundtrip(bits):
    q = torch.randint(0, 2 ** bits, (5, 64), dtype=torch.uint8)
    p = intq.pack_codes(q, bits)
    assert p.shape == (5, 64 * bits // 8) and p.dtype == torch.uint8
    assert torch.equal(intq.unpack_codes(p, bits, 64), q)
    c = torch.randint(0, 16, (64,), dtype=torch.uint8)
    assert torch.equal(bnb4.unpack_nibbles(bnb4.pack_nibbles(c)), c)


def test_hand_made_tensors_dequantize():
    spec = QuantSpec("int", 4, 8, sym=True)
    t = {"qweight": torch.tensor([[0x21, 0x43, 0x0F, 0xF0]], dtype=torch.uint8),
         "scales": torch.tensor([[0.5]], dtype=torch.float16)}
    assert intq.dequantize(t, spec, 1, 8).tolist() == [[-3.5, -3.0, -2.5, -2.0, 3.5, -4.0, -4.0, 3.5]]
    t = {"qweight": torch.tensor([[0x03, 0x75]], dtype=torch.uint8),
         "scales": torch.tensor([[2.0]], dtype=torch.float16),
         "zeros": torch.tensor([[5]], dtype=torch.uint8)}
    assert intq.dequantize(t, QuantSpec("int", 2, 8, zero_mode="int"), 1, 8).tolist() == \
        [[-4.0, -10.0, -10.0, -10.0, -8.0, -8.0, -4.0, -8.0]]
    # bytes -> codes [0, 15, 7, 15, 3, 11, 8, 0] (high nibble first), absmax 2
    t = {"qweight": torch.tensor([0x0F, 0x7F, 0x3B, 0x80], dtype=torch.uint8), "absmax": torch.tensor([2.0])}
    nf4 = [-2, 2, 0, 2, 2 * -0.39491748809814453, 2 * 0.33791524171829224, 2 * 0.07958029955625534, -2]
    assert bnb4.dequantize(t, QuantSpec("nf4", 4, 8), 1, 8).tolist() == [nf4]
    assert bnb4.dequantize(t, QuantSpec("fp4", 4, 8), 1, 8).tolist() == [[0, -0.5, 0.5, -0.5, 2, -2, -0.0, 0]]


# ------------------------------------------------------------------ RTN error and exact grids

@pytest.mark.parametrize("spec", INT_SPECS, ids=_ids(INT_SPECS))
def test_int_rtn_error_at_most_half_a_step(spec):
    w = _weights()
    t = intq.quantize(w, spec)
    g = _group(spec)
    err = (intq.dequantize(t, spec, N, K) - w).abs().reshape(N, K // g, g).amax(-1)  # [N, G]
    span = w.reshape(N, K // g, g).abs().amax(-1)
    bound = t["scales"].float() / 2 + 2 ** -10 * span + 1e-7   # + float16 rounding of s and m
    assert (err <= bound).all(), float((err - bound).max())


HALF_SPECS = INT_SPECS[::5] + BNB_SPECS + [INT8_SPEC]


@pytest.mark.parametrize("spec", HALF_SPECS, ids=_ids(HALF_SPECS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_quantized_in_fp32(spec, dtype):
    fmt, w = module_for(spec), _weights(dtype=dtype)
    a, b = fmt.quantize(w, spec), fmt.quantize(w.float(), spec)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fmt.dequantize(a, spec, N, K, dtype=dtype).dtype == dtype


def _int_grid(spec, gen):
    g, maxq = _group(spec), 2 ** spec.bits - 1
    lo = 1 if spec.sym else 0
    q = torch.randint(lo, maxq + 1, (N, K // g, g), generator=gen)
    q[..., 0], q[..., -1] = lo, maxq                            # each group spans the grid
    t = {"qweight": intq.pack_codes(q.reshape(N, K), spec.bits),
         "scales": (0.01 + 0.09 * torch.rand(N, K // g, generator=gen)).half()}
    if not spec.sym and spec.zero_mode == "int":
        t["zeros"] = torch.randint(0, maxq + 1, (N, K // g), generator=gen).to(torch.uint8)
    elif not spec.sym:
        t["mins"] = (-0.5 * torch.rand(N, K // g, generator=gen)).half()
    return t


@pytest.mark.parametrize("spec", INT_SPECS, ids=_ids(INT_SPECS))
def test_int_exact_on_grid(spec):
    t = _int_grid(spec, torch.Generator().manual_seed(1))
    t2 = intq.quantize(intq.dequantize(t, spec, N, K), spec)
    assert all(torch.equal(t[k], t2[k]) for k in t)


@pytest.mark.parametrize("spec", BNB_SPECS, ids=_ids(BNB_SPECS))
def test_bnb4_exact_on_grid(spec):
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (N * K // 64, 64), generator=gen)
    if spec.fmt == "fp4":
        codes[codes == 8] = 0                                   # "-0" reads back as +0
    codes[:, 0] = 15 if spec.fmt == "nf4" else 3                # a +-1.0 value in every block
    codes[::2, 0] = 0 if spec.fmt == "nf4" else 11
    t = {"qweight": bnb4.pack_nibbles(codes), "absmax": 0.1 + torch.rand(N * K // 64, generator=gen)}
    plain = replace(spec, double_quant=False)
    w = bnb4.dequantize(t, plain, N, K)
    t2 = bnb4.quantize(w, spec)
    assert torch.equal(t2["qweight"], t["qweight"])
    if not spec.double_quant:
        assert torch.equal(t2["absmax"], t["absmax"])


def test_int8_exact_on_grid():
    gen = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (N, K), generator=gen).to(torch.int8)
    q[:, 0] = 127
    q[::3, 0] = -127
    t = {"qweight": q, "scales": (0.001 + torch.rand(N, generator=gen) * 0.01).half().float()}
    t2 = int8.quantize(int8.dequantize(t, INT8_SPEC, N, K), INT8_SPEC)
    assert torch.equal(t2["qweight"], t["qweight"]) and torch.equal(t2["scales"], t["scales"])


@pytest.mark.parametrize("spec", BNB_SPECS, ids=_ids(BNB_SPECS))
def test_bnb4_error(spec):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(4))
    t = bnb4.quantize(w, spec)
    wd = bnb4.dequantize(t, spec, N, K)
    rel = float((wd - w).norm() / w.norm())
    assert rel < {"nf4": 0.10, "fp4": 0.13}[spec.fmt], rel
    a_true = w.reshape(-1, 64).abs().amax(-1)
    a_eff = bnb4._absmax_of(t, spec)
    if spec.double_quant:
        a2 = t["absmax2"].repeat_interleave(256)[: a_true.numel()]
        assert ((a_eff - a_true).abs() <= 0.0075 * a2).all()
    half_gap = float(bnb4.code_table(spec.fmt).sort().values.diff().max()) / 2
    bound = half_gap * a_true + (a_eff - a_true).abs() + 1e-6
    assert ((wd - w).abs().reshape(-1, 64) <= bound.unsqueeze(-1)).all()


# ------------------------------------------------------------------ QuantLinear

@pytest.mark.parametrize("spec", INT_SPECS + BNB_SPECS, ids=_ids(INT_SPECS + BNB_SPECS))
def test_quantlinear_matches_dequantized_linear(spec):
    torch.manual_seed(5)
    lin = nn.Linear(K, N, bias=True)
    q = QuantLinear.from_linear(lin, spec)
    assert q.weight_shape == (N, K)
    assert [n for n, _ in q.named_parameters()] == list(q.packed_names) + ["bias"]
    assert not any(p.requires_grad for p in q.parameters())
    x = torch.randn(3, 5, K)
    assert torch.equal(q(x), F.linear(x, q.dequantize(), lin.bias))
    xb = x.bfloat16()
    yb = q(xb)
    assert yb.dtype == torch.bfloat16 and yb.shape == (3, 5, N)
    assert torch.equal(yb, F.linear(xb, q.dequantize(torch.bfloat16), lin.bias.bfloat16()))


def test_quantlinear_meta_construction():
    spec = QuantSpec("nf4", 4, 64, double_quant=True)
    q = QuantLinear(K, N, bias=False, spec=spec)
    shapes = bnb4.packed_shapes(spec, N, K)
    assert q.bias is None
    for name, (shape, dtype) in shapes.items():
        p = getattr(q, name)
        assert isinstance(p, nn.Parameter) and p.is_meta and p.shape == shape and p.dtype == dtype
    assert set(q.state_dict()) == set(shapes)
    with pytest.raises(ValueError, match="not divisible"):
        QuantLinear(96, 8, True, spec)


# ------------------------------------------------------------------ int8 (LLM.int8)

def _int8_expected(x, t, cols):
    """The LLM.int8 decomposition written out: outlier columns in float, the rest int8."""
    wd = t["qweight"].float() * t["scales"].unsqueeze(-1)
    keep = torch.ones(x.shape[-1], dtype=torch.bool)
    keep[cols] = False
    xi = x * keep
    amax = xi.abs().amax(-1, keepdim=True)
    xq = torch.round(xi * 127 / amax)
    acc = xq.double() @ t["qweight"].double().T                           # exact integers
    return (acc * (amax.double() / 127) * t["scales"].double()).float() + x[:, cols] @ wd[:, cols].T


def test_int8_outlier_decomposition_and_threshold():
    gen = torch.Generator().manual_seed(6)
    w = 0.05 * torch.randn(N, K, generator=gen)
    t = int8.quantize(w, INT8_SPEC)
    wd = int8.dequantize(t, INT8_SPEC, N, K)
    x = torch.randn(10, K, generator=gen).clamp(-4, 4)
    x[:, 3] = 40 * torch.sign(torch.randn(10, generator=gen))     # outlier in every row
    x[4, 77] = -25.0                                               # outlier in one row only
    x[:, 200] = 8.0                                                # just above 6
    for thr, cols in [(6.0, [3, 77, 200]), (8.0, [3, 77]), (30.0, [3]), (100.0, []), (0.0, [])]:
        y = int8.linear(x, t, replace(INT8_SPEC, threshold=thr), N, K)
        torch.testing.assert_close(y, _int8_expected(x, t, cols), rtol=1e-5, atol=1e-5)
    ref = x @ wd.T
    err = lambda y: float((y - ref).norm() / ref.norm())         # noqa: E731
    with_dec = err(int8.linear(x, t, INT8_SPEC, N, K))
    without = err(int8.linear(x, t, replace(INT8_SPEC, threshold=0.0), N, K))
    assert with_dec < 0.01 and without > 5 * with_dec, (with_dec, without)


def test_int8_quantlinear_all_outliers_is_float_linear():
    torch.manual_seed(7)
    lin = nn.Linear(K, N, bias=True)
    q = QuantLinear.from_linear(lin, replace(INT8_SPEC, threshold=1e-9))
    x = torch.randn(2, 3, K)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), lin.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [64, 4096])                          # fp32 and fp64 emulation
def test_int8_matmul_exact(k):
    a = torch.randint(-127, 128, (9, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, k), dtype=torch.int8)
    assert torch.equal(int8.int8_matmul(a, b), (a.long() @ b.long().T).to(torch.int32))


# ------------------------------------------------------------------ swap_linears on real skeletons

def test_swap_linears_llama_meta():
    from tiny import make_config
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_config("llama", num_hidden_layers=2))
    swapped = swap_linears(model, QuantSpec("nf4", 4, 64))
    proj = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj"]                       # down_proj: K=96 % 64 -> kept
    assert set(swapped) == {f"model.layers.{i}.{p}" for i in range(2) for p in proj}
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    q, transposed = swapped["model.layers.1.self_attn.k_proj"]
    assert model.model.layers[1].self_attn.k_proj is q and not transposed
    assert q.weight_shape == (32, 64) and q.qweight.is_meta and q.bias is None
    skipped = swap_linears(model, QuantSpec("int", 4, 32), skip=("lm_head", "model.layers.0.*", "up_proj"))
    assert set(skipped) == {"model.layers.1.mlp.down_proj"}
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(make_config("llama", num_hidden_layers=2))
    ragged = swap_linears(fresh, QuantSpec("int", 4, 64))                  # int groups may end short
    assert len(ragged) == 14 and "model.layers.0.mlp.down_proj" in ragged


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_swap_linears_forward_matches_dequantized_model(model_type):
    from tiny import make_config
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(8)
    model = AutoModelForCausalLM.from_config(make_config(model_type, num_hidden_layers=2)).eval()
    ref = AutoModelForCausalLM.from_config(make_config(model_type, num_hidden_layers=2)).eval()
    ref.load_state_dict(model.state_dict())
    spec = QuantSpec("int", 4, 32, sym=True)
    old = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    swapped = swap_linears(model, spec, device="cpu")
    assert "lm_head" not in swapped and swapped
    for name, (q, transposed) in swapped.items():
        assert transposed == isinstance(old[name], Conv1D)
        w = old[name].weight.detach()
        t = intq.quantize(w.T if transposed else w, spec)
        q.load_packed(t)
        if q.bias is not None:
            q.bias.data.copy_(old[name].bias)
        wd = intq.dequantize(t, spec, *q.weight_shape)
        ref.get_submodule(name).weight.data.copy_(wd.T if transposed else wd)
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ bitsandbytes compatibility

@pytest.fixture(scope="module")
def bnbF():
    try:
        with warnings.catch_warnings():                    # bnb's imports use deprecated torch.jit
            warnings.simplefilter("ignore", DeprecationWarning)
            import bitsandbytes.functional as bF
        bF.quantize_4bit(torch.randn(64, 64), blocksize=64, quant_type="nf4")
    except Exception as e:  # not installed, or no CPU backend in this version
        pytest.skip(f"bitsandbytes not usable on CPU: {e!r}")
    return bF


def test_bnb_tables(bnbF):
    assert torch.equal(bnb4.dynamic_map(), bnbF.create_dynamic_map())
    for f in ("nf4", "fp4"):
        assert torch.equal(bnb4.code_table(f), bnbF.get_4bit_type(f, device="cpu"))


def _zero_canon(p: torch.Tensor) -> torch.Tensor:
    """fp4 codes with "-0" (0b1000) mapped to +0: the one documented byte difference."""
    c = bnb4.unpack_nibbles(p)
    return torch.where(c == 8, 0, c)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dq", [False, True])
def test_bnb_quantize_4bit_compatible(bnbF, fmt, dtype, dq):
    w = _weights(seed=9, dtype=dtype)
    spec = QuantSpec(fmt, 4, 64, double_quant=dq)
    t = bnb4.quantize(w, spec)
    qb, st = bnbF.quantize_4bit(w, blocksize=64, quant_type=fmt, compress_statistics=dq)
    qb = qb.flatten()
    if fmt == "nf4":
        assert torch.equal(t["qweight"], qb)
    else:
        assert torch.equal(_zero_canon(t["qweight"]), _zero_canon(qb))
    if not dq:
        assert torch.equal(t["absmax"], st.absmax)
    else:
        assert torch.equal(t["offset"], st.offset.reshape(1))
        assert torch.equal(t["absmax2"], st.state2.absmax)
        ours, theirs = t["absmax_q"].long(), st.absmax.long()
        diff = ours != theirs
        assert diff.float().mean() < 0.02 and ((ours - theirs).abs()[diff] == 1).all()
        a2 = t["absmax2"].repeat_interleave(256)[: ours.numel()]
        target = (w.float().reshape(-1, 64).abs().amax(-1) - t["offset"]) / a2   # what was rounded
        dyn = bnb4.dynamic_map()
        assert ((dyn[ours] - target).abs() <= (dyn[theirs] - target).abs()).all()  # ours is nearest
        st.absmax = t["absmax_q"].clone()                          # bnb reads our codes back
    assert torch.equal(bnb4.dequantize(t, spec, N, K, dtype=dtype), bnbF.dequantize_4bit(qb.unsqueeze(1), st))
