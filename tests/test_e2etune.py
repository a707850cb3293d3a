"""End-to-end distillation of a quantized checkpoint (runtime/quant/e2etune.py, e2e_ckpt.py)."""
import json

import pytest
import torch

import exa
from runtime.qcheckpoint import rewrite_tensors
from runtime.quant import intq
from runtime.quant.calib_data import calibration_text
from runtime.quant.calibrate import calibrate
from runtime.quant.e2e_ckpt import split_windows, spread_windows, tune_checkpoint
from runtime.quant.e2etune import e2e_tune, load_quantized
from test_gptq import CALIB, SPEC, _same_files, _text  # noqa: F401
from tiny import save_tiny

E2E = dict(steps=40, lr=3e-3, batch=4, seqlen=64, device="cpu", progress=False)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny llama, a GPTQ checkpoint of it, and a copy of that checkpoint tuned end to end."""
    root = tmp_path_factory.mktemp("e2e")
    src = save_tiny("llama", root / "fp")
    calibrate(str(src), root / "q", SPEC, "gptq", calibration=_text(1), **CALIB)
    import shutil
    shutil.copytree(root / "q", root / "t")
    res = tune_checkpoint(root / "t", str(src), calibration=_text(2), **E2E)
    return src, root / "q", root / "t", res


def _held_out_kl(src, ckpt, windows) -> float:
    """Mean per-token KL(float || quantized) of the engine's logits on ``windows``."""
    from transformers import AutoModelForCausalLM
    fp = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with exa.Inference(str(ckpt), offload="none", device="cpu", progress=False) as llm, torch.no_grad():
        kl = 0.0
        for w in windows:
            t = torch.log_softmax(fp(w[None]).logits.float(), -1)
            q = torch.log_softmax(llm.engine.forward(w[None]).float(), -1)
            kl += float((t.exp() * (t - q)).sum(-1).mean())
    return kl / len(windows)


def test_tuning_lowers_the_held_out_kl_and_the_checkpoint_holds_it(tuned):
    src, before, after, res = tuned
    assert res.kept and res.after < 0.95 * res.before, (res.before, res.after)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(src))(calibration_text(_text(2)), return_tensors="pt")["input_ids"][0]
    _, val = split_windows(ids, 64)
    assert _held_out_kl(src, before, val) == pytest.approx(res.before, rel=1e-3)
    assert _held_out_kl(src, after, val) == pytest.approx(res.after, rel=1e-3)    # what it measured is stored
    spec0, q0, o0 = load_quantized(before)
    spec1, q1, o1 = load_quantized(after)
    assert spec0 == spec1 and set(q0) == set(q1)
    for n in q0:                                    # codes and zero points stay, scales move
        assert torch.equal(q0[n]["qweight"], q1[n]["qweight"]) and torch.equal(q0[n]["zeros"], q1[n]["zeros"])
        assert q1[n]["scales"].dtype == torch.float16
    assert any(not torch.equal(q0[n]["scales"], q1[n]["scales"]) for n in q0)
    assert any(not torch.equal(o0[k], o1[k]) for k in o0 if "norm" in k)
    assert all(torch.equal(o0[k], o1[k]) for k in o0 if "norm" not in k)          # embeddings untouched
    meta = json.loads((after / "exa.json").read_text())["metadata"]["e2e"]
    assert meta["kept"] and meta["kl_after"] == res.after


def test_a_token_tensor_tunes_like_the_text_it_came_from(tuned, tmp_path):
    """Calibration given as token ids (as GPTQ accepts it) gives the same windows, so the same run."""
    import shutil

    from transformers import AutoTokenizer
    src, before, _, res = tuned
    shutil.copytree(before, tmp_path / "t")
    ids = AutoTokenizer.from_pretrained(str(src))(calibration_text(_text(2)), return_tensors="pt")["input_ids"][0]
    got = tune_checkpoint(tmp_path / "t", str(src), calibration=ids[None], **E2E)
    assert (got.before, got.after, got.history) == (res.before, res.after, res.history)


def test_ema_measures_and_keeps_the_moving_average(tuned):
    """With a decay near 1 the average never leaves the start; a moderate decay
    still learns, along another path than the plain iterate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, before, _, _ = tuned
    spec, quant, other = load_quantized(before)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(src))(calibration_text(_text(2)), return_tensors="pt")["input_ids"][0]
    train, val = split_windows(ids, 64)
    kw = dict(steps=20, lr=3e-3, batch=4, init=other, eval_every=5, progress=False)
    plain = e2e_tune(model, quant, spec, train, val, **kw)
    frozen = e2e_tune(model, quant, spec, train, val, ema=1 - 1e-9, **kw)
    avg = e2e_tune(model, quant, spec, train, val, ema=0.7, **kw)
    assert plain.kept and avg.kept and avg.after < avg.before
    assert all(abs(kl - frozen.before) < 1e-6 for _, kl in frozen.history + [(0, frozen.after)]), (frozen.history, frozen.after, frozen.before)
    assert [kl for _, kl in avg.history[1:]] != [kl for _, kl in plain.history[1:]]


def test_cosine_schedule_learns_along_another_path(tuned):
    """schedule='cos' decays the learning rate to 0: it still learns, along another path than
    the constant rate, and its last steps move the parameters less."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src, before, _, _ = tuned
    spec, quant, other = load_quantized(before)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(src))(calibration_text(_text(2)), return_tensors="pt")["input_ids"][0]
    train, val = split_windows(ids, 64)
    kw = dict(lr=3e-3, batch=4, init=other, eval_every=1, progress=False)
    const = e2e_tune(model, quant, spec, train, val, steps=20, **kw)
    cos = e2e_tune(model, quant, spec, train, val, steps=20, schedule="cos", **kw)
    assert cos.kept and cos.after < cos.before
    assert [kl for _, kl in cos.history[1:]] != [kl for _, kl in const.history[1:]]
    assert cos.history[1] == const.history[1]           # the first step is taken at the full rate
    last = lambda r: abs(r.history[-1][1] - r.history[-2][1])          # noqa: E731
    assert last(cos) < last(const)


def test_rerun_is_a_no_op_and_other_settings_are_refused(tuned):
    src, _, after, _ = tuned
    snapshot = {p: p.read_bytes() for p in after.rglob("*") if p.is_file()}
    assert tune_checkpoint(after, str(src), calibration=_text(2), **E2E) is None
    assert snapshot == {p: p.read_bytes() for p in after.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="other settings"):
        tune_checkpoint(after, str(src), calibration=_text(2), **{**E2E, "steps": 41})


def test_a_failed_rewrite_leaves_the_checkpoint_as_it_was(tuned, tmp_path):
    import shutil
    _, before, _, _ = tuned
    ck = tmp_path / "ck"
    shutil.copytree(before, ck)
    spec, quant, _ = load_quantized(ck)
    name = sorted(quant)[0]
    with pytest.raises(KeyError, match="not in"):
        rewrite_tensors(ck, {f"{name}.scales": quant[name]["scales"] * 2, "no.such.tensor": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="shape"):
        rewrite_tensors(ck, {f"{name}.scales": torch.zeros(3)}, {})
    _same_files(before, ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]                       # no leftovers


def test_bad_inputs_are_refused(tuned, tmp_path, monkeypatch):
    src, before, _, _ = tuned
    spec, quant, other = load_quantized(before)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="steps"):
        e2e_tune(model, {}, spec, torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), steps=0)
    with pytest.raises(ValueError, match="ema"):
        e2e_tune(model, {}, spec, torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
                 steps=1, ema=1.0)
    with pytest.raises(ValueError, match="schedule"):
        e2e_tune(model, {}, spec, torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long),
                 steps=1, schedule="linear")
    with pytest.raises(ValueError, match="at least 2 windows"):
        split_windows(torch.arange(100), 64)
    with pytest.raises(ValueError, match="float model"):
        tune_checkpoint(before, str(before), calibration=_text(2), **E2E)
    import psutil

    class _Small:
        available = 1 << 20
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Small())
    with pytest.raises(MemoryError, match="whole model"):
        tune_checkpoint(before, str(src), calibration=_text(2), **E2E)
    monkeypatch.undo()
    rtn = tmp_path / "nf4"
    exa.Quantize(str(src), quant_type="nf4").save(rtn)
    with pytest.raises(ValueError, match="int format"):
        load_quantized(rtn)


def test_gptqinference_finishes_an_interrupted_e2e_stage(tmp_path):
    """A cached checkpoint without its e2e stage (a run stopped after calibration) is tuned on
    the next use; a second use changes nothing."""
    src = save_tiny("llama", tmp_path / "fp")
    kw = dict(quantization_config_dataset=_text(2), group_size=32, calibration_samples=8,
              calibration_seqlen=64, cache_dir=tmp_path / "cache", device="cpu", progress=False)
    eng = exa.GPTQInference(str(src), e2e=20, **kw)
    out = eng.checkpoint_dir
    exa.Quantize(str(src), method="gptq", group_size=32, calibration=_text(2), calibration_samples=8,
                 calibration_seqlen=64, compute_dtype=torch.float32, device="cpu").save(out, progress=False)
    assert "e2e" not in json.loads((out / "exa.json").read_text())["metadata"]
    assert eng.quantize(progress=False) == out
    meta = json.loads((out / "exa.json").read_text())["metadata"]["e2e"]
    assert meta["settings"]["steps"] == 20 and meta["kl_after"] <= meta["kl_before"]
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    eng.quantize(progress=False)
    assert snapshot == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="method='gptq'"):
        exa.Quantize(str(src), e2e=5)
    other = exa.GPTQInference(str(src), e2e=20, e2e_text="wiki", e2e_windows=7, e2e_lr=5e-4, **kw)
    assert other.checkpoint_dir != out                        # the extra e2e options are part of the key
    assert other._e2e_extra() == dict(text="wiki", text_windows=7, lr=5e-4, batch=4)
    extra = tmp_path / "extra.txt"
    extra.write_text("one text")
    first = exa.GPTQInference(str(src), e2e=20, e2e_text=str(extra), **kw).checkpoint_dir
    extra.write_text("another text")                           # keyed by content, not by path
    assert exa.GPTQInference(str(src), e2e=20, e2e_text=str(extra), **kw).checkpoint_dir != first
    assert eng._e2e_extra() == dict(text=None, text_windows=1024, lr=1e-3, batch=4)


def test_extra_text_windows_are_trained_on_and_recorded(tuned, tmp_path):
    """``text``: windows spread over another text join the training windows (not the held-out
    ones), change the run, and are recorded in the manifest by name and count."""
    import shutil
    src, before, _, res = tuned
    shutil.copytree(before, tmp_path / "t")
    got = tune_checkpoint(tmp_path / "t", str(src), calibration=_text(2), text=_text(3), text_windows=3, **E2E)
    assert got.before == res.before and got.history != res.history           # same held-out windows
    meta = json.loads((tmp_path / "t" / "exa.json").read_text())["metadata"]["e2e"]
    ref = json.loads((tuned[2] / "exa.json").read_text())["metadata"]["e2e"]
    assert meta["train_windows"] == ref["train_windows"] + 3
    assert meta["held_out_windows"] == ref["held_out_windows"]
    assert meta["settings"]["text_windows"] == 3 and meta["settings"]["text"].startswith("text:")
    assert "text" not in ref["settings"]                                       # unset: the old settings
    with pytest.raises(ValueError, match="windows must be >= 1"):
        tune_checkpoint(tmp_path / "t", str(src), calibration=_text(2), text=_text(3), text_windows=0, **E2E)


def test_spread_windows_are_evenly_spaced():
    ids = torch.arange(10 * 4 + 3)
    w = spread_windows(ids, 4, 4)
    assert w[:, 0].tolist() == [0, 12, 24, 36]               # windows 0, 3, 6, 9 of 10
    assert torch.equal(spread_windows(ids, 4, 50), ids[:40].reshape(10, 4))
    with pytest.raises(ValueError, match="less than one window"):
        spread_windows(torch.arange(3), 4, 2)
