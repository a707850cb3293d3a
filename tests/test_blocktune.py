"""Block-wise tuning of a quantized decoder layer (runtime/quant/blocktune.py, GPTQ's ``tune``)."""
import pytest
import torch

from runtime.quant import intq
from runtime.quant.blocktune import _loss, tune_layer
from runtime.quant.calibrate import CalibOptions, calibrate
from runtime.quant.spec import QuantSpec
from test_gptq import CALIB, SPEC, _interrupt_after_two, _one_thread, _same_files, _text  # noqa: F401
from tiny import make_config

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _layer_case(spec: QuantSpec, seed: int = 0):
    """A tiny llama decoder layer whose linears hold their RTN weights, its float twin's outputs
    ``y`` on random inputs ``hs [6, 16, 64]``, and the layer's keyword arguments."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    torch.manual_seed(seed)
    cfg = make_config("llama")
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    hs = torch.randn(6, 16, cfg.hidden_size)
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": LlamaRotaryEmbedding(cfg)(hs, pos), "position_ids": pos,
              "attention_mask": torch.full((16, 16), float("-inf")).triu(1)[None, None]}
    with torch.no_grad():
        outs = [layer(hs[j:j + 1], **kwargs) for j in range(6)]
        y = torch.cat([o[0] if isinstance(o, (tuple, list)) else o for o in outs])
        targets, packed = {}, {}
        for n in LINEARS:
            mod = layer.get_submodule(n)
            packed[n] = intq.quantize(mod.weight, spec)
            mod.weight.copy_(intq.dequantize(packed[n], spec, *mod.weight.shape))
            targets[n] = (mod, False)
    return layer, targets, packed, hs, y, kwargs


@pytest.mark.parametrize("sink", [1.0, 8.0])
def test_tuning_lowers_the_layer_loss_and_stores_what_it_measured(sink):
    spec = SPEC
    layer, targets, packed, hs, y, kwargs = _layer_case(spec)
    with torch.inference_mode():                   # as the calibrator calls it
        res = tune_layer(layer, targets, packed, spec, hs, y, kwargs, steps=200, batch=2, sink_weight=sink)
    assert res.kept and res.after < 0.95 * res.before, (res.before, res.after)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        again = sum(float(_loss(layer, params, hs[j:j + 1], y[j:j + 1], kwargs, sink, 1)) for j in range(6)) / 6
    assert again == pytest.approx(res.after, rel=1e-4)       # the layer holds the stored result
    for n, (mod, _) in targets.items():
        N, K = mod.weight.shape
        new, old = res.packed[n], packed[n]
        torch.testing.assert_close(mod.weight, intq.dequantize(new, spec, N, K), rtol=0, atol=0)
        torch.testing.assert_close(new["zeros"], old["zeros"], rtol=0, atol=0)
        assert new["scales"].dtype == torch.float16
        moved = (intq.unpack_codes(new["qweight"], 4, K).int() - intq.unpack_codes(old["qweight"], 4, K).int())
        assert moved.abs().max() <= 1
    assert any(not torch.equal(res.packed[n]["qweight"], packed[n]["qweight"]) for n in LINEARS)


def test_no_steps_keeps_gptqs_result():
    layer, targets, packed, hs, y, kwargs = _layer_case(SPEC, seed=1)
    w = {n: m.weight.clone() for n, (m, _) in targets.items()}
    with torch.inference_mode():
        res = tune_layer(layer, targets, packed, SPEC, hs, y, kwargs, steps=0)
    assert not res.kept and res.after == res.before
    assert all(res.packed[n] is packed[n] and torch.equal(targets[n][0].weight, w[n]) for n in LINEARS)


def test_tuned_gptq_runs_through_the_engine_and_resumes_to_the_same_bytes(tiny_models, tmp_path):
    path = tiny_models("llama")
    opts = CalibOptions(tune=20, tune_batch=2, fp_target=1.0)
    full = calibrate(str(path), tmp_path / "full", SPEC, "gptq", calibration=_text(1), options=opts, **CALIB)
    assert len(full.stats["tune"]) == 4
    assert all(after <= before for before, after in full.stats["tune"])
    _interrupt_after_two(path, tmp_path / "part", _text(1), opts)
    part = calibrate(str(path), tmp_path / "part", SPEC, "gptq", calibration=_text(1), options=opts, **CALIB)
    assert [k for k, v in part.losses.items() if v is None] == ["layers.0", "layers.1"]
    _same_files(full.path, part.path)

