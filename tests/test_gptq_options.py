"""GPTQ options: clipping (mse) search, attention-sink weighting, grid refit, float target."""
import pytest
import torch

from runtime.quant import intq
from runtime.quant.calibrate import CalibOptions, calibrate
from runtime.quant.fp_target import target_weight
from runtime.quant.gptq import MSE_NORM, Hessian, gptq_quantize
from runtime.quant.refit import dequant, refit_grid, row_loss
from runtime.quant.spec import QuantSpec
from test_gptq import (CALIB, SPEC, _correlated, _interrupt_after_two, _logits, _one_thread,  # noqa: F401
                       _out_err, _same_files, _text, eval_ids)
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


# ----------------------------------------------------------------------------- grid refit

def _damped(H, damp=0.01):
    Hd = H.clone()
    Hd.diagonal().add_(damp * float(torch.diag(H).mean()))
    return Hd


@pytest.mark.parametrize("spec", [QuantSpec("int", 4, 128, zero_mode="int"),
                                  QuantSpec("int", 3, 64, zero_mode="int"),
                                  QuantSpec("int", 4, 64, sym=True)], ids=lambda s: s.name)
@pytest.mark.parametrize("opts", [{}, {"desc_act": True, "mse": True}], ids=["plain", "act-mse"])
def test_refit_never_increases_any_rows_hessian_loss(case, spec, opts):
    """The refit grids are stored exactly (dequantize == weight), every row's H-weighted loss is
    at most the unrefit one, and the total drops."""
    W, _, X_test, h = case
    N, K = W.shape
    Hd = _damped(h.H)
    plain = gptq_quantize(W, h.H, spec, **opts)
    for rounds in (1, 2):
        res = gptq_quantize(W, h.H, spec, refit=rounds, **opts)
        torch.testing.assert_close(intq.dequantize(res.packed, spec, N, K), res.weight, rtol=0, atol=0)
        before, after = row_loss(W, plain.weight, Hd), row_loss(W, res.weight, Hd)
        assert (after <= before * (1 + 1e-5)).all()
        assert after.sum() < 0.99 * before.sum()
        assert res.loss == pytest.approx(float(after.sum()) / 2, rel=1e-4)
    assert _out_err(W, res.weight, X_test) < _out_err(W, plain.weight, X_test)


def test_refit_recovers_an_exact_grid():
    """Weights that lie exactly on an int4 grid: from the right codes and a wrong grid, the refit
    finds the grid back (loss 0), with a dense (coupled) H."""
    torch.manual_seed(1)
    spec, g, N, K = QuantSpec("int", 4, 32, zero_mode="int"), 32, 8, 96
    q = torch.randint(0, 16, (N, K)).float()
    z = torch.randint(3, 12, (N, K // g)).float()
    s = (torch.rand(N, K // g) * 0.05 + 0.01).half()
    W = dequant(q, s.float(), z, g)
    X = torch.randn(400, K) @ (torch.randn(K, K) / K ** 0.5 + torch.eye(K))
    H = 2 * X.t() @ X / 400
    s_new, z_new, loss = refit_grid(W, q, (s.float() * 1.3).half(), (z + 1).clamp(max=15), H, spec, g)
    torch.testing.assert_close(z_new, z, rtol=0, atol=0)
    torch.testing.assert_close(s_new, s, rtol=1e-3, atol=0)
    assert float(loss.max()) < 1e-6 * float(row_loss(W, torch.zeros_like(W), H).min())


# ----------------------------------------------------------------------------- float target

def test_fp_target_is_the_least_squares_weight():
    """W_t minimises ||X_fp W^T - X_q W_t^T||^2 (no damping); equal inputs give W back."""
    torch.manual_seed(2)
    N, K, n = 16, 24, 500
    W = torch.randn(N, K)
    Xq = torch.randn(n, K) @ (torch.randn(K, K) / K ** 0.5 + torch.eye(K))
    Xfp = Xq + 0.1 * torch.randn(n, K)
    H, C = 2 * Xq.t() @ Xq / n, 2 * Xq.t() @ Xfp / n
    Wt = target_weight(W, H, C, 1.0, damp_percent=0.0)
    ls = torch.linalg.lstsq(Xq.double(), (Xfp @ W.t()).double()).solution.t().float()
    torch.testing.assert_close(Wt, ls, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(target_weight(W, H, H, 1.0, 0.01), W)
    torch.testing.assert_close(target_weight(W, H, C, 0.5, 0.0), (W + Wt) / 2, rtol=1e-3, atol=1e-3)


def test_fp_target_calibrates_resumes_and_beats_rtn(tiny_models, tmp_path, eval_ids):  # noqa: F811
    """fp_target runs through the engine, a resumed run (float states rebuilt from the float
    blocks) writes the same bytes, and the result beats RTN."""
    path = tiny_models("llama")
    opts = CalibOptions(fp_target=1.0, refit=1)
    full = calibrate(str(path), tmp_path / "full", SPEC, "gptq", calibration=_text(1), options=opts, **CALIB)
    _interrupt_after_two(path, tmp_path / "part", _text(1), opts)
    part = calibrate(str(path), tmp_path / "part", SPEC, "gptq", calibration=_text(1), options=opts, **CALIB)
    assert [k for k, v in part.losses.items() if v is None] == ["layers.0", "layers.1"]
    files = _same_files(full.path, part.path)
    assert any(f.parts[0] == "blocks" for f in files)
    with torch.no_grad():
        ref = reference(path)(eval_ids).logits
    ours, rtn = _logits(full.path, eval_ids), _logits(path, eval_ids, quantize=SPEC)
    assert float(((ours - ref) ** 2).mean()) < 0.8 * float(((rtn - ref) ** 2).mean())


@pytest.mark.parametrize("flags,used,bads", [
    (["--refit", "2", "--fp-target", "0.5"], {"refit": 2, "fp_target": 0.5}, [{"refit": -1}, {"fp_target": 1.5}]),
    (["--tune", "5", "--tune-sink-weight", "4"], {"tune": 5, "tune_sink_weight": 4.0},
     [{"tune": -1}, {"tune": 2.5}, {"tune_sink_weight": 0}]),
    (["--e2e", "3", "--e2e-generate", "2", "--e2e-lr", "2e-3", "--e2e-batch", "2"],
     {"steps": 3, "generate": 2, "seqlen": 64, "lr": 2e-3, "batch": 2},
     [{"e2e": -1}, {"e2e_generate": 1.5}, {"e2e_windows": 0}, {"e2e_batch": 0}, {"e2e_lr": 0.0}]),
], ids=["refit-fp-target", "tune", "e2e"])
def test_new_options_reach_the_checkpoint_through_cli_and_api(tiny_models, tmp_path, flags, used, bads):
    """refit / fp_target / tune (recorded run options) and e2e (its own manifest entry) flow
    from `exa quantize` into the checkpoint; bad values are refused by exa.Quantize."""
    import json

    import exa
    from exa.cli import main
    path = tiny_models("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(_text(4)))
    main(["quantize", str(path), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", str(calib),
          "--calib-samples", "4", "--calib-seqlen", "64", *flags, "--out", str(tmp_path / "cli")])
    meta = json.loads((tmp_path / "cli" / "exa.json").read_text())["metadata"]
    recorded = meta["e2e"]["settings"] if "--e2e" in flags else meta["options"]
    assert {k: recorded[k] for k in used} == used
    for bad in bads:
        with pytest.raises(ValueError, match=next(iter(bad))):
            exa.Quantize(str(path), method="gptq", **bad)
