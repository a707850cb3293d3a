"""GPTQ with groups formed in act-order (spec ``act_order``: the input permutation is stored)."""
import dataclasses

import pytest
import torch

from runtime.quant import intq
from runtime.quant._common import natural_order
from runtime.quant.calibrate import CalibOptions, calibrate
from runtime.quant.gptq import Hessian, gptq_quantize
from runtime.quant.linear import QuantLinear
from runtime.quant.spec import QuantSpec
from test_gptq import CALIB, _correlated, _logits, _out_err, _text, eval_ids  # noqa: F401
from tiny import reference

ACT = QuantSpec("int", 4, 32, zero_mode="int", act_order=True)


@pytest.fixture(scope="module")
def case():
    """Every 4th input column is 8x busier and holds 8x smaller weights (as outlier channels
    of LLMs do): natural groups take their ranges from the large weights of the quiet columns,
    act-order groups give the busy columns their own, finer grids."""
    torch.manual_seed(0)
    N, K = 48, 256
    loud = torch.zeros(K, dtype=torch.bool)
    loud[::4] = True
    W = torch.randn(N, K) * 0.05
    W[:, ~loud] *= 8
    X = _correlated(3072, K, 3) * 0.1
    X[:, loud] *= 8
    h = Hessian(K)
    h.add(X[:2048])
    return W, X[2048:], h


@pytest.mark.parametrize("opts", [{}, {"mse": True, "refit": 1}], ids=["plain", "mse-refit"])
def test_act_order_groups_are_gptq_on_the_permuted_problem(case, opts):
    """The result is GPTQ run on the columns in order of decreasing H[k, k] (natural groups of
    that order), with ``perm`` stored; the returned weight is in the original order and is what
    the stored tensors dequantize to, and QuantLinear computes with it."""
    W, X, h = case
    res = gptq_quantize(W, h.H, ACT, **opts)
    perm = res.packed["perm"]
    assert perm.dtype == torch.int32
    assert torch.equal(perm.long(), torch.argsort(torch.diag(h.H), descending=True, stable=True))
    p = perm.long()
    plain = gptq_quantize(W[:, p], h.H[p][:, p], dataclasses.replace(ACT, act_order=False), **opts)
    assert all(torch.equal(plain.packed[k], res.packed[k]) for k in plain.packed)
    N, K = W.shape
    D = natural_order(intq.dequantize(res.packed, ACT, N, K), res.packed)
    torch.testing.assert_close(D, res.weight, rtol=0, atol=0)
    lin = QuantLinear(K, N, False, ACT, device="cpu")
    lin.load_packed(res.packed)
    torch.testing.assert_close(lin.dequantize(), res.weight, rtol=0, atol=0)
    torch.testing.assert_close(lin(X[:8]), X[:8] @ res.weight.t(), rtol=1e-5, atol=1e-5)


def test_act_order_groups_beat_static_groups_when_columns_differ(case):
    W, X, h = case
    static = gptq_quantize(W, h.H, dataclasses.replace(ACT, act_order=False), desc_act=True)
    grouped = gptq_quantize(W, h.H, ACT)
    assert _out_err(W, grouped.weight, X) < 0.5 * _out_err(W, static.weight, X)


def test_act_order_groups_calibrate_tune_and_distil_through_the_engine(tiny_models, tmp_path, eval_ids):  # noqa: F811
    """A checkpoint with act-order groups (+ block-wise tuning) stores a perm per linear, runs
    through the engine close to the float model, and the e2e stage tunes it."""
    from runtime.quant.e2e_ckpt import tune_checkpoint
    from runtime.quant.e2etune import load_quantized
    path = tiny_models("llama")
    opts = CalibOptions(desc_act=True, tune=10, tune_batch=2)
    res = calibrate(str(path), tmp_path / "q", ACT, "gptq", calibration=_text(1), options=opts, **CALIB)
    spec, quant, _ = load_quantized(res.path)
    assert spec.act_order and all("perm" in t for t in quant.values())
    assert any(not torch.equal(t["perm"].long(), torch.arange(t["perm"].numel())) for t in quant.values())
    with torch.no_grad():
        ref = reference(path)(eval_ids).logits
    plain = dataclasses.replace(ACT, act_order=False)
    ours, rtn = _logits(res.path, eval_ids), _logits(path, eval_ids, quantize=plain)
    assert float(((ours - ref) ** 2).mean()) < 0.8 * float(((rtn - ref) ** 2).mean())
    e2e = tune_checkpoint(res.path, str(path), calibration=_text(2), steps=40, lr=3e-3, batch=4, seqlen=64,
                          device="cpu", progress=False)
    assert e2e.kept and e2e.after < e2e.before
    from test_e2etune import _held_out_kl
    from transformers import AutoTokenizer

    from runtime.quant.calib_data import calibration_text
    from runtime.quant.e2e_ckpt import split_windows
    ids = AutoTokenizer.from_pretrained(str(path))(calibration_text(_text(2)), return_tensors="pt")["input_ids"][0]
    assert _held_out_kl(path, res.path, split_windows(ids, 64)[1]) == pytest.approx(e2e.after, rel=1e-3)
    _, quant2, _ = load_quantized(res.path)
    assert all(torch.equal(quant[n]["perm"], quant2[n]["perm"]) for n in quant)


def test_only_gptq_writes_act_order_groups(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="act_order"):
        calibrate(str(tiny_models("llama")), tmp_path / "a", ACT, "awq", calibration=_text(1), **CALIB)


def test_act_groups_through_cli_and_api(tiny_models, tmp_path):
    """`exa quantize --desc-act --act-groups` writes a checkpoint with act-order groups that loads;
    act_groups without desc_act, or with another method, is refused; GPTQInference keeps it
    apart in its cache."""
    import json

    import exa
    from exa.cli import main
    from runtime.quant.e2etune import load_quantized
    path = tiny_models("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(_text(4)))
    main(["quantize", str(path), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", str(calib),
          "--calib-samples", "4", "--calib-seqlen", "64", "--desc-act", "--act-groups", "--out", str(tmp_path / "q")])
    assert json.loads((tmp_path / "q" / "exa.json").read_text())["quantization"]["act_order"] is True
    spec, quant, _ = load_quantized(tmp_path / "q")
    assert spec.act_order and all(t["perm"].dtype == torch.int32 for t in quant.values())
    with exa.Inference(str(tmp_path / "q"), offload="none", device="cpu", progress=False) as llm:
        assert torch.isfinite(llm.engine.forward(torch.tensor([[1, 2, 3]]))).all()
    for bad in ({"method": "gptq"}, {"method": "awq", "desc_act": True}):
        with pytest.raises(ValueError, match="act_groups"):
            exa.Quantize(str(path), act_groups=True, **bad)
    a = exa.GPTQInference(str(path), desc_act=True, cache_dir=tmp_path / "c")
    b = exa.GPTQInference(str(path), desc_act=True, act_groups=True, cache_dir=tmp_path / "c")
    assert a.checkpoint_dir != b.checkpoint_dir
