"""Quantized models end to end: on-the-fly RTN, exa checkpoints, placements, hub, perplexity."""
import json
import math
import shutil

import pytest
import torch

import exa
from runtime.quant.spec import QuantSpec, spec_from_name
from tiny import reference

SPECS = [spec_from_name("int4", group_size=32), spec_from_name("int4", group_size=32, sym=True),
         QuantSpec("int", 4, 32, zero_mode="int"), spec_from_name("int3", group_size=32),
         spec_from_name("int2", group_size=32), spec_from_name("int8"),
         spec_from_name("nf4", group_size=32), spec_from_name("fp4", group_size=32, double_quant=True)]
IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))


def _fake_quant_reference(path, spec):
    """transformers' model with every quantized linear replaced by its dequantized weight."""
    from runtime.quant import module_for
    ref = reference(path)
    for name, mod in ref.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            fmt = module_for(spec)
            w = mod.weight.data.float()
            mod.weight.data = fmt.dequantize(fmt.quantize(w, spec), spec, *w.shape)
    return ref


@pytest.mark.parametrize("spec", [s for s in SPECS if s.fmt != "int8"], ids=lambda s: s.name)
def test_quantized_logits_equal_transformers_with_dequantized_weights(spec, tiny_models):
    path = tiny_models("llama")
    with torch.no_grad():
        want = _fake_quant_reference(path, spec)(IDS).logits
    with exa.Inference(str(path), quantize=spec, offload="none", device="cpu", progress=False) as llm:
        torch.testing.assert_close(llm.logits(IDS), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_placement_of_a_quantized_model_matches_all_resident(spec, tiny_models, tmp_path):
    path = tiny_models("qwen2")
    with exa.Inference(str(path), quantize=spec, offload="none", device="cpu", progress=False) as llm:
        want, want_tokens = llm.logits(IDS), llm.generate_ids(IDS[:1], 6)
        qbytes = llm.plan.blocks[1].nbytes
    for place in ["disk", {"layers.1": "disk", "head": "disk"}]:
        with exa.Inference(str(path), quantize=spec, offload=place, device="cpu", offload_dir=str(tmp_path),
                           prefetch_depth=2, progress=False) as llm:
            assert torch.equal(llm.logits(IDS), want)
            assert torch.equal(llm.generate_ids(IDS[:1], 6), want_tokens)
    with exa.Inference(str(path), offload="none", device="cpu", dtype=torch.bfloat16, progress=False) as llm:
        assert qbytes < llm.plan.blocks[1].nbytes            # a quantized layer streams fewer bytes


def test_saved_checkpoint_loads_without_requantizing(tiny_models, tmp_path):
    path = tiny_models("llama")
    q = exa.Quantize(str(path), quant_type="int4", group_size=32, compute_dtype=torch.float32, verbose=True)
    q.log_metadata({"note": "test"})
    out = q.save(tmp_path / "q4")
    manifest = json.loads((out / "exa.json").read_text())
    assert manifest["quantization"]["bits"] == 4 and manifest["metadata"]["note"] == "test"
    assert all(len(r["sha256"]) == 64 for r in manifest["blocks"]) and q.errors
    with exa.Inference(str(path), quantize=q.spec, offload="none", device="cpu", progress=False) as a, \
            exa.Inference(str(out), offload="disk", device="cpu", offload_dir=str(tmp_path / "off"),
                          progress=False) as b:
        assert b.engine.quant == q.spec
        torch.testing.assert_close(b.logits(IDS), a.logits(IDS), rtol=0, atol=0)
        assert b.generate("hello", max_new_tokens=4) == a.generate("hello", max_new_tokens=4)


def test_save_progress_bar_only_when_asked(tiny_models, tmp_path, capsys):
    q = exa.Quantize(str(tiny_models("llama")), quant_type="int4", group_size=32)
    q.save(tmp_path / "quiet", progress=False)
    assert "quantizing to" not in capsys.readouterr().err
    q.save(tmp_path / "loud")
    assert "quantizing to int4" in capsys.readouterr().err


def test_corrupted_or_truncated_shard_is_named(tiny_models, tmp_path):
    out = exa.Quantize(str(tiny_models("llama")), quant_type="nf4").save(tmp_path / "nf4")
    shard = sorted((out / "blocks").iterdir())[2]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=shard.name):
        exa.Inference(str(out), device="cpu", progress=False)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=shard.name):
        exa.Inference(str(out), device="cpu", progress=False)


def test_failed_save_leaves_nothing_behind(tiny_models, tmp_path, monkeypatch):
    import exa.quantize as qmod
    calls = {"n": 0}
    real = qmod.pack_block

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk full")
        return real(*a, **kw)
    monkeypatch.setattr(qmod, "pack_block", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        exa.Quantize(str(tiny_models("llama"))).save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cannot_requantize_an_exa_checkpoint(tiny_models, tmp_path):
    out = exa.Quantize(str(tiny_models("llama")), quant_type="int4", group_size=32).save(tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        exa.Inference(str(out), quantize="nf4", device="cpu", progress=False)


class _FakeHub:
    """Stands in for huggingface_hub.HfApi: records calls, 'uploads' into a local folder."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))

    def upload_folder(self, folder_path, repo_id, commit_message):
        self.calls.append(("upload_folder", repo_id))
        shutil.copytree(folder_path, self.root / repo_id.replace("/", "--"))


def test_push_and_load_from_hub_with_a_fake_hub(tiny_models, tmp_path, monkeypatch):
    import exa.hub as hub
    fake = _FakeHub(tmp_path / "hub")
    monkeypatch.setattr(hub, "_api", lambda token: fake)
    q = exa.Quantize(str(tiny_models("llama")), quant_type="int4", group_size=32)
    q.log_metadata({"perplexity": 12.5, "perplexity_text": "lee_background"})
    with pytest.raises(hub.HubError, match="token"):
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
        q.push_to_hub("me/tiny-q4", out_dir=tmp_path / "local")
    url = q.push_to_hub("me/tiny-q4", out_dir=tmp_path / "local", token="hf_fake")
    assert url.endswith("me/tiny-q4") and [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    card = (tmp_path / "hub" / "me--tiny-q4" / "README.md").read_text()
    assert "int" in card and "| group size | 32 |" in card and "12.5" in card
    monkeypatch.setattr("huggingface_hub.snapshot_download",
                        lambda repo_id, token=None: str(tmp_path / "hub" / repo_id.replace("/", "--")))
    with q.load_from_hub("me/tiny-q4", device="cpu", progress=False) as llm:
        assert llm.engine.quant == q.spec


def test_hub_errors_are_clear_when_offline(monkeypatch):
    import exa.hub as hub

    def offline(*a, **kw):
        raise OSError("network is unreachable")
    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(hub.HubError, match="offline"):
        hub.download("me/whatever")


def test_perplexity_equals_exp_mean_cross_entropy(tiny_models, tmp_path):
    path = tiny_models("llama")
    text = "The quick brown fox jumps over the lazy dog. " * 6
    (tmp_path / "t.txt").write_text(text)
    with exa.Inference(str(path), offload="none", device="cpu", progress=False) as llm:
        ids = llm.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ce = torch.nn.functional.cross_entropy(reference(path)(ids).logits[0, :-1], ids[0, 1:])
        got = exa.perplexity(llm, str(tmp_path / "t.txt"), max_length=ids.shape[1], stride=ids.shape[1],
                             progress=False)
        assert got == pytest.approx(math.exp(float(ce)), rel=1e-4)
        windowed = exa.perplexity(llm, text, max_length=64, stride=32, progress=False)
        assert math.isfinite(windowed) and windowed != got


def test_cli_quantize_then_ppl(tiny_models, tmp_path, capsys):
    from exa.cli import main
    out = tmp_path / "cli-q"
    main(["quantize", str(tiny_models("llama")), "--out", str(out), "--quant-type", "int4", "--group-size", "32"])
    assert "wrote" in capsys.readouterr().out and (out / "exa.json").is_file()
    (tmp_path / "t.txt").write_text("hello world, hello exa. " * 10)
    main(["ppl", str(out), "--text", str(tmp_path / "t.txt"), "--device", "cpu", "--max-length", "64",
          "--stride", "32"])
    assert "perplexity" in capsys.readouterr().out
