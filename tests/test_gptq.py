"""Calibrated quantization: GPTQ for one linear, AWQ scales, and the layer-by-layer driver."""
import json
from pathlib import Path

import pytest
import torch

import exa
from runtime.kernels.reference import dequant
from runtime.quant import QuantLinear, intq
from runtime.quant.awq import apply_scale, search_scale
from runtime.quant.calibrate import CalibOptions, calibrate
from runtime.quant.gptq import Hessian, gptq_quantize
from runtime.quant.spec import QuantSpec
from tiny import reference

# English-like calibration / evaluation text for the byte-level tiny models (disjoint halves)
_WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
          "this be or has had not but first one their its new after who they have two been than "
          "more other into most only over city some such when during time made may these").split()


def _text(seed: int, n: int = 40) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(_WORDS[int(i)] for i in torch.randint(len(_WORDS), (60,), generator=g)) + "."
            for _ in range(n)]


def _correlated(n: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + 0.3 * torch.eye(K)
    scale = torch.rand(K, generator=g) * 3 + 0.1                     # uneven channel magnitudes
    return (torch.randn(n, K, generator=torch.Generator().manual_seed(seed + 1)) @ mix) * scale


@pytest.fixture(scope="module")
def linear_case():
    torch.manual_seed(0)
    N, K = 64, 256
    W = torch.randn(N, K) * 0.05
    X_all = _correlated(3072, K, 1)
    X, X_test = X_all[:2048], X_all[2048:]                           # held-out test inputs
    h = Hessian(K)
    for chunk in X.split(500):
        h.add(chunk)
    return W, X, X_test, h


def _out_err(W, D, X) -> float:
    return float(((X @ (D - W).T) ** 2).mean())


def test_hessian_is_twice_the_mean_outer_product(linear_case):
    _, X, _, h = linear_case
    assert h.n == X.shape[0]
    torch.testing.assert_close(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits,group,opts", [
    (4, 32, {}), (3, 64, {}), (4, -1, {}), (4, 32, {"desc_act": True}), (3, 64, {"desc_act": True}),
    (2, 32, {"static_groups": True}),           # 2 bits with grids from updated weights: ~RTN only
])
def test_gptq_beats_rtn_on_held_out_inputs(linear_case, bits, group, opts):
    W, _, X_test, h = linear_case
    spec = QuantSpec("int", bits, group, zero_mode="int")
    rtn = intq.dequantize(intq.quantize(W, spec), spec, *W.shape)
    res = gptq_quantize(W, h.H, spec, **opts)
    assert res.loss > 0
    assert _out_err(W, res.weight, X_test) < 0.75 * _out_err(W, rtn, X_test)


@pytest.mark.parametrize("spec,opts", [
    (QuantSpec("int", 4, 32, zero_mode="int"), {}),
    (QuantSpec("int", 3, 64, zero_mode="int"), {"desc_act": True}),
    (QuantSpec("int", 4, 64, sym=True), {"static_groups": True}),
    (QuantSpec("int", 8, -1, zero_mode="int"), {"desc_act": True}),
    (QuantSpec("int", 2, 32, zero_mode="int"), {"block_size": 48}),
], ids=lambda v: getattr(v, "name", str(v)))
def test_packed_result_dequantizes_like_quantlinear_and_reference(linear_case, spec, opts):
    W, X, _, h = linear_case
    res = gptq_quantize(W, h.H, spec, **opts)
    N, K = W.shape
    for name, (shape, dtype) in intq.packed_shapes(spec, N, K).items():
        assert tuple(res.packed[name].shape) == shape and res.packed[name].dtype == dtype
    torch.testing.assert_close(dequant(res.packed, spec, N, K), res.weight, rtol=0, atol=0)
    q = QuantLinear(K, N, False, spec, device="cpu")
    q.load_packed(res.packed)
    torch.testing.assert_close(q(X[:8]), X[:8] @ res.weight.T, rtol=1e-5, atol=1e-5)


def test_dead_inputs_and_bad_specs(linear_case):
    W, _, _, h = linear_case
    H = h.H.clone()
    H[:, 3] = 0
    H[3, :] = 0
    res = gptq_quantize(W, H, QuantSpec("int", 4, 32, zero_mode="int"))
    assert torch.isfinite(res.weight).all()
    with pytest.raises(ValueError, match="zero_mode"):
        gptq_quantize(W, h.H, QuantSpec("int", 4, 32))                # the "min" grid is not GPTQ's
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq_quantize(W, h.H[:8, :8], QuantSpec("int", 4, 32, zero_mode="int"))


def test_awq_scale_search_keeps_the_function_and_beats_rtn():
    torch.manual_seed(0)
    K, N = 64, 48
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.rand(K) + 0.5, requires_grad=False)
    layer = torch.nn.Module()
    layer.norm, layer.fc = norm, torch.nn.Linear(K, N, bias=False)
    torch.nn.init.normal_(layer.fc.weight, std=0.1)
    x = _correlated(256, K, 3)[None]                                 # [1, T, K]
    from runtime.models.groups import ScaleGroup
    group = ScaleGroup("norm", ("fc",), "fc")
    spec = QuantSpec("int", 3, 32, zero_mode="int")
    with torch.no_grad():
        ref = layer.fc(x)
        s, alpha, mse = search_scale(group, layer, [((x,), {})], spec, n_grid=10)
        rtn = float(((torch.nn.functional.linear(x, intq.dequantize(
            intq.quantize(layer.fc.weight, spec), spec, N, K)) - ref) ** 2).mean())
        assert mse <= rtn + 1e-12 and alpha > 0
        w0, n0 = layer.fc.weight.clone(), norm.weight.clone()
        apply_scale(group, layer, s)
        torch.testing.assert_close(layer.fc.weight * norm.weight, w0 * n0, rtol=1e-5, atol=1e-6)


# -- end to end on the tiny llama --------------------------------------------------------------
SPEC = QuantSpec("int", 4, 32, zero_mode="int")
CALIB = dict(n_samples=8, seqlen=64, compute_dtype=torch.float32, progress=False)


def _logits(path, ids, **kw):
    with exa.Inference(str(path), offload="none", device="cpu", progress=False, **kw) as llm:
        return llm.engine.forward(ids)


@pytest.fixture(scope="module")
def eval_ids(tiny_models):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_models("llama")))
    return tok(" ".join(_text(99, 4)), return_tensors="pt")["input_ids"][:, :200]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one thread avoids per-op thread hand-offs (slow on a busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_tiny_llama_loads_and_is_close_to_fp32(method, tiny_models, tmp_path, eval_ids):
    path = tiny_models("llama")
    res = calibrate(str(path), tmp_path / method, SPEC, method, calibration=_text(1), **CALIB)
    assert set(res.losses) == {f"layers.{i}" for i in range(4)}
    assert res.stats["max_live_blocks"] == 1
    m = json.loads((res.path / "exa.json").read_text())
    assert m["quantization"]["zero_mode"] == "int" and m["metadata"]["method"] == method
    with torch.no_grad():
        ref = reference(path)(eval_ids).logits
    ours = _logits(res.path, eval_ids)
    rtn = _logits(path, eval_ids, quantize=SPEC)
    err, err_rtn = float(((ours - ref) ** 2).mean()), float(((rtn - ref) ** 2).mean())
    assert err < 0.05 * float((ref ** 2).mean()), (err, err_rtn)
    if method == "gptq":
        assert err < 0.8 * err_rtn, (err, err_rtn)                  # calibrated beats RTN
    else:
        # AWQ lowers each scale group's own output error (tested above), but on this random
        # tiny model that does not carry to the logits (the v_proj error correlates with the
        # RTN o_proj error): only "close to fp32", and not far from RTN, is asserted here.
        assert err < 2.0 * err_rtn, (err, err_rtn)


def _interrupt_after_two(path, out, text, opts) -> None:
    """A GPTQ run into ``out`` interrupted (KeyboardInterrupt) once layers.1 is written."""
    def stop_after_two(name, info):
        if name == "layers.1":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        calibrate(str(path), out, SPEC, "gptq", calibration=text, options=opts,
                  on_block=stop_after_two, **CALIB)


def _same_files(a: Path, b: Path) -> list:
    """Assert checkpoints ``a`` and ``b`` hold the same files, byte for byte; returns the list."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    return files


def test_interrupted_run_resumes_to_the_same_bytes(tiny_models, tmp_path):
    path = tiny_models("llama")
    opts = CalibOptions(desc_act=True)
    full = calibrate(str(path), tmp_path / "full", SPEC, "gptq", calibration=_text(2), options=opts, **CALIB)
    _interrupt_after_two(path, tmp_path / "part", _text(2), opts)
    assert not (tmp_path / "part" / "exa.json").exists()             # not a loadable checkpoint yet
    with pytest.raises(FileExistsError, match="other settings"):
        calibrate(str(path), tmp_path / "part", SPEC, "awq", calibration=_text(2), **CALIB)
    res = calibrate(str(path), tmp_path / "part", SPEC, "gptq", calibration=_text(2), options=opts, **CALIB)
    assert res.losses["layers.0"] is None and res.losses["layers.1"] is None
    assert res.losses["layers.2"] is not None
    _same_files(full.path, res.path)


def test_only_one_block_is_materialised_at_a_time(tiny_models, tmp_path):
    """The float model is never built: every parameter outside the bound block stays on meta."""
    path = tiny_models("llama")
    seen = []

    def check(name, info):
        run = check.run
        real = [n for n, p in list(run.fp_model.named_parameters()) + list(run.q_model.named_parameters())
                if p.device.type != "meta"]
        seen.append((name, len(real), set(info["live"])))
    from runtime.quant.calibrate import Calibrator
    c = Calibrator(str(path), tmp_path / "q", SPEC, "gptq", calibration=_text(3), on_block=check, **CALIB)
    check.run = c
    res = c.run()
    assert [s[0] for s in seen] == [f"layers.{i}" for i in range(4)]
    assert all(n_real == 0 and not live for _, n_real, live in seen)  # nothing bound between blocks
    assert res.stats["max_live_blocks"] == 1
    assert c.stats["bound"][:3] == ["embed", "fp:layers.0", "layers.0"]


def test_quantize_api_and_cli(tiny_models, tmp_path, capsys):
    from exa.cli import main
    path = tiny_models("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(_text(4)))
    q = exa.Quantize(str(path), bits=3, group_size=32, method="awq", calibration=str(calib),
                     calibration_samples=4, calibration_seqlen=64)
    assert q.spec == QuantSpec("int", 3, 32, zero_mode="int")
    with pytest.raises(ValueError, match="int format"):
        exa.Quantize(str(path), quant_type="nf4", method="gptq")
    main(["quantize", str(path), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", str(calib),
          "--calib-samples", "4", "--calib-seqlen", "64", "--out", str(tmp_path / "cli")])
    assert "gptq int4-g32-asym-int" in capsys.readouterr().out
    main(["quantize", str(path), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", str(calib),
          "--calib-samples", "4", "--calib-seqlen", "64", "--mse", "--sink-weight", "64", "--desc-act",
          "--out", str(tmp_path / "cli-opts")])
    import json
    settings = json.dumps(json.loads((tmp_path / "cli-opts" / "exa.json").read_text()))
    assert '"mse": true' in settings and '"sink_weight": 64.0' in settings    # recorded with the run
    with pytest.raises(ValueError, match="sink_weight"):
        exa.Quantize(str(path), method="gptq", sink_weight=0)
    with exa.Inference(str(tmp_path / "cli"), device="cpu", progress=False) as llm:
        assert isinstance(llm.generate("the city", max_new_tokens=3), str)


def test_gptq_inference_quantizes_once_then_uses_the_cache(tiny_models, tmp_path):
    path = tiny_models("llama")
    kw = dict(quantization_config_dataset=_text(5), max_length=40, group_size=32, calibration_samples=4,
              calibration_seqlen=64, cache_dir=tmp_path / "c", device="cpu", progress=False)
    with exa.GPTQInference(str(path), quantization_config_bits=4, **kw) as engine:
        text = engine.generate("Once upon a time")
        assert isinstance(text, str)
        ckpt = engine.checkpoint_dir
    mtime = (ckpt / "exa.json").stat().st_mtime_ns
    with exa.GPTQInference(str(path), quantization_config_bits=4, **kw) as again:
        assert again.generate("Once upon a time") == text
    assert (ckpt / "exa.json").stat().st_mtime_ns == mtime           # loaded, not re-quantized
    # other GPTQ options are another cache entry, and reach the quantizer
    with exa.GPTQInference(str(path), quantization_config_bits=4, mse=True, sink_weight=64, refit=1,
                           fp_target=0.5, **kw) as opts:
        assert opts.checkpoint_dir != ckpt
        opts.quantize(progress=False)
        used = json.loads((opts.checkpoint_dir / "exa.json").read_text())["metadata"]["options"]
        assert used["mse"] is True and used["sink_weight"] == 64.0
        assert used["refit"] == 1 and used["fp_target"] == 0.5
