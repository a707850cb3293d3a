"""GPTQ options: the clipping (mse) grid search and attention-sink weighting."""
import pytest
import torch

from runtime.quant import intq
from runtime.quant.calibrate import CalibOptions, calibrate
from runtime.quant.gptq import MSE_NORM, Hessian, gptq_quantize
from runtime.quant.spec import QuantSpec
from test_gptq import CALIB, SPEC, _correlated, _logits, _one_thread, _out_err, _text, eval_ids  # noqa: F401
from tiny import reference


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    N, K = 64, 256
    W = torch.randn(N, K) * 0.05
    W[:, ::37] *= 6                                                   # a few outlier weights per row
    X = _correlated(3072, K, 1)
    h = Hessian(K)
    h.add(X[:2048])
    return W, X[:2048], X[2048:], h


@pytest.mark.parametrize("spec", [QuantSpec("int", 4, 128, zero_mode="int"),
                                  QuantSpec("int", 3, 32, zero_mode="int"),
                                  QuantSpec("int", 4, 64, sym=True)], ids=lambda s: s.name)
def test_mse_grid_never_loses_to_min_max_per_group(case, spec):
    """With H = I nothing propagates: GPTQ is RTN on its grid, and the searched range beats
    (or equals) min/max on every group's |w - Q(w)|^2.4."""
    W = case[0]
    N, K = W.shape
    plain = gptq_quantize(W, torch.eye(K), spec)
    assert all(torch.equal(plain.packed[k], v) for k, v in intq.quantize(W, spec).items())
    res = gptq_quantize(W, torch.eye(K), spec, mse=True)
    torch.testing.assert_close(intq.dequantize(res.packed, spec, N, K), res.weight, rtol=0, atol=0)
    g = spec.group_size

    def err(D):
        return ((D - W).abs() ** MSE_NORM).reshape(N, K // g, g).sum(-1)
    assert (err(res.weight) <= err(plain.weight) * (1 + 1e-5)).all()
    assert err(res.weight).sum() < 0.97 * err(plain.weight).sum()


@pytest.mark.parametrize("opts", [{"mse": True}, {"mse": True, "desc_act": True}])
def test_mse_gptq_beats_rtn_on_held_out_inputs(case, opts):
    W, _, X_test, h = case
    spec = QuantSpec("int", 4, 32, zero_mode="int")
    rtn = intq.dequantize(intq.quantize(W, spec), spec, *W.shape)
    res = gptq_quantize(W, h.H, spec, **opts)
    assert _out_err(W, res.weight, X_test) < 0.75 * _out_err(W, rtn, X_test)


def test_sink_tokens_weigh_more_in_the_attention_input_hessians(tiny_models, tmp_path, monkeypatch):
    """With sink_weight w, q/k/v's Hessians see each window's first token scaled by sqrt(w)
    (weight w); the rest of the window is unchanged."""
    seen = {}

    def run(weight):
        xs = seen[weight] = []
        orig = Hessian.add
        monkeypatch.setattr(Hessian, "add", lambda self, x: (xs.append(x.clone()), orig(self, x))[1])
        opts = CalibOptions(sink_weight=weight)
        calibrate(str(tiny_models("llama")), tmp_path / str(weight), SPEC, "gptq", calibration=_text(1),
                  options=opts, **CALIB)
        monkeypatch.undo()
    run(1.0)
    run(4.0)
    n_first = 3 * 8                                   # layer 0's q, k, v, once per window (8 windows)
    a, b = seen[1.0], seen[4.0]
    assert len(a) == len(b)
    for x1, x4 in zip(a[:n_first], b[:n_first]):
        torch.testing.assert_close(x4[..., 0, :], 2 * x1[..., 0, :])
        torch.testing.assert_close(x4[..., 1:, :], x1[..., 1:, :])


@pytest.mark.parametrize("opts", [CalibOptions(mse=True, sink_weight=64.0),
                                  CalibOptions(desc_act=True, sink_weight=16.0, true_sequential=False)],
                         ids=["mse-sink", "act-sink-not-sequential"])
def test_calibrated_options_tiny_llama_beat_rtn(opts, tiny_models, tmp_path, eval_ids):  # noqa: F811
    path = tiny_models("llama")
    res = calibrate(str(path), tmp_path / "q", SPEC, "gptq", calibration=_text(1), options=opts, **CALIB)
    with torch.no_grad():
        ref = reference(path)(eval_ids).logits
    ours, rtn = _logits(res.path, eval_ids), _logits(path, eval_ids, quantize=SPEC)
    err, err_rtn = float(((ours - ref) ** 2).mean()), float(((rtn - ref) ** 2).mean())
    assert err < 0.8 * err_rtn, (err, err_rtn)
