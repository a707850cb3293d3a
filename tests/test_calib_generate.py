"""Calibration on windows sampled from the float model as well (``generate``; calibrate.py,
e2e_ckpt.sampled_calibration), and a calibration stopped before its first block resuming."""
import pytest
import torch

import runtime.quant.e2e_ckpt as e2e_ckpt
from runtime.qcheckpoint import ResumableWriter
from runtime.quant.calib_data import calibration_ids
from runtime.quant.calibrate import calibrate
from test_gptq import CALIB, SPEC, _text


def _blocks(path):
    return {p.name: p.read_bytes() for p in sorted((path / "blocks").iterdir())}


@pytest.fixture(scope="module")
def generated(tiny_models, tmp_path_factory):
    path = tiny_models("llama")
    out = tmp_path_factory.mktemp("gen") / "q"
    return path, calibrate(str(path), out, SPEC, "gptq", calibration=_text(2), generate=4, **CALIB)


def test_sampled_windows_are_calibrated_on(generated, tmp_path):
    """The same checkpoint as calibrating on the text windows followed by the sampled ones."""
    from transformers import AutoTokenizer
    path, res = generated
    text = calibration_ids(AutoTokenizer.from_pretrained(str(path)), _text(2), CALIB["n_samples"], CALIB["seqlen"])
    model, _ = e2e_ckpt.float_model(str(path), "cpu")
    sampled = e2e_ckpt.sampled_windows(model, text, 4, CALIB["seqlen"])
    assert not any(torch.equal(s, t) for s in sampled for t in text)
    ids = torch.cat([text, sampled])
    direct = calibrate(str(path), tmp_path / "d", SPEC, "gptq", calibration=ids.reshape(-1),
                       **{**CALIB, "n_samples": ids.shape[0]})
    assert _blocks(res.path) == _blocks(direct.path)
    plain = calibrate(str(path), tmp_path / "p", SPEC, "gptq", calibration=_text(2), **CALIB)
    assert _blocks(res.path) != _blocks(plain.path)
    import json
    meta = json.loads((res.path / "exa.json").read_text())["metadata"]["calibration"]
    assert meta["sampled_windows"] == 4 and meta["samples"] == CALIB["n_samples"]
    assert not (res.path / ".exa-sampled.pt").exists()          # dropped once the run finished


def test_a_resumed_run_reuses_the_sampled_windows(generated, tmp_path, monkeypatch):
    path, res = generated

    def stop(name, info):
        if name == "layers.1":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        calibrate(str(path), tmp_path / "q", SPEC, "gptq", calibration=_text(2), generate=4, on_block=stop, **CALIB)
    assert (tmp_path / "q" / ".exa-sampled.pt").is_file()

    def no_sampling(*a, **k):
        raise AssertionError("sampled again on resume")
    monkeypatch.setattr(e2e_ckpt, "sampled_windows", no_sampling)
    again = calibrate(str(path), tmp_path / "q", SPEC, "gptq", calibration=_text(2), generate=4, **CALIB)
    assert again.losses["layers.0"] is None and again.losses["layers.2"] is not None
    assert _blocks(again.path) == _blocks(res.path)


def test_a_run_stopped_before_its_first_block_resumes(tmp_path):
    ResumableWriter(tmp_path / "q", {"a": 1})                 # claimed, nothing written yet
    ResumableWriter(tmp_path / "q", {"a": 1})                 # the same run goes on
    with pytest.raises(FileExistsError, match="other settings"):
        ResumableWriter(tmp_path / "q", {"a": 2})


def test_bad_counts_are_refused(tiny_models):
    import exa
    with pytest.raises(ValueError, match="calibration_generate"):
        exa.Quantize(str(tiny_models("llama")), method="gptq", calibration_generate=-1)
    with pytest.raises(ValueError, match="calibrated methods"):
        exa.Quantize(str(tiny_models("llama")), calibration_generate=4)


def test_cli_and_gptqinference_pass_it_on(generated, tmp_path):
    import json

    import exa
    from exa.cli import main
    path, res = generated
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(_text(2)))
    main(["quantize", str(path), "--method", "gptq", "--bits", "4", "--group-size", "32", "--calib", str(calib),
          "--calib-samples", "8", "--calib-seqlen", "64", "--calib-generate", "4", "--device", "cpu",
          "--out", str(tmp_path / "cli")])
    assert json.loads((tmp_path / "cli" / "exa.json").read_text())["metadata"]["calibration"]["sampled_windows"] == 4
    g = exa.GPTQInference(str(path), quantization_config_bits=4, quantization_config_dataset=_text(2), group_size=32,
                          calibration_samples=8, calibration_seqlen=64, calibration_generate=4,
                          cache_dir=tmp_path / "cache", device="cpu")
    plain = exa.GPTQInference(str(path), quantization_config_bits=4, quantization_config_dataset=_text(2),
                              group_size=32, calibration_samples=8, calibration_seqlen=64,
                              cache_dir=tmp_path / "cache", device="cpu")
    assert g.checkpoint_dir != plain.checkpoint_dir
    meta = json.loads((g.quantize(progress=False) / "exa.json").read_text())["metadata"]["calibration"]
    assert meta["sampled_windows"] == 4


def test_sampling_temperature_and_top_p(generated):
    """A tiny nucleus keeps only the most likely token: the windows are the greedy continuation;
    the default (the model's own distribution) differs from it; bad settings are refused."""
    path, _ = generated
    model, _ = e2e_ckpt.float_model(str(path), "cpu")
    prompts = torch.randint(3, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    nucleus = e2e_ckpt.sampled_windows(model, prompts, 3, 16, prefix=4, top_p=1e-6)
    gen = torch.Generator().manual_seed(1)                  # the prompts sampled_windows picks
    order = torch.randint(0, 3, (3,), generator=gen)
    assert torch.equal(nucleus[:, :4], prompts[order, :4])
    greedy = model.generate(prompts[order, :4], attention_mask=torch.ones(3, 4, dtype=torch.long), do_sample=False,
                            max_new_tokens=12, min_new_tokens=12, pad_token_id=model.config.eos_token_id)
    assert torch.equal(nucleus, greedy)
    assert not torch.equal(e2e_ckpt.sampled_windows(model, prompts, 3, 16, prefix=4), greedy)
    for bad in ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="top_p"):
            e2e_ckpt.sampled_windows(model, prompts, 1, 16, **bad)
