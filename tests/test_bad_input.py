"""Bad input gets a clear error that names the problem, the file or the parameter; never a hang."""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import exa
from runtime.checkpoint import CheckpointError


def _load(path, tmp_path, **kw):
    kw.setdefault("device", "cpu")
    return exa.Inference(str(path), progress=False, offload_dir=str(tmp_path / "offload"), **kw)


@pytest.fixture
def model_dir(tiny_models, tmp_path):
    """A private copy of the sharded tiny llama (the shared one is never modified)."""
    return shutil.copytree(tiny_models("llama"), tmp_path / "model")


@pytest.fixture(scope="module")
def llm(tiny_models, tmp_path_factory):
    path = tiny_models("llama")
    with _load(path, tmp_path_factory.mktemp("llm")) as m:
        yield m


def _index(d):
    return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]


def _shard_of(d, weight):
    return d / _index(d)[weight]


def _files_under(path):
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# -- paths and files -------------------------------------------------------------------------
def test_nonexistent_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(CheckpointError, match=re.escape(str(missing)) + ".*does not exist"):
        _load(missing, tmp_path)


def test_path_to_a_file_that_is_not_a_model(tiny_models, tmp_path):
    cfg = tiny_models("llama") / "config.json"
    with pytest.raises(CheckpointError, match=re.escape(str(cfg)) + " is neither a model directory nor"):
        _load(cfg, tmp_path)


def test_unreachable_hub_id(tmp_path, monkeypatch):
    """Offline here: a hub id fails at once with a message saying what to pass instead."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="could not download 'no-such-org-x/no-such-model'"):
        _load("no-such-org-x/no-such-model", tmp_path)


def test_directory_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        _load(tmp_path / "m", tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_config_that_is_not_a_json_object(tmp_path, text):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json.*(not valid JSON|JSON object)"):
        _load(tmp_path / "m", tmp_path)


def test_config_without_weights(model_dir, tmp_path):
    for p in model_dir.glob("model*"):
        p.unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights in .*model$"):
        _load(model_dir, tmp_path)
    (model_dir / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*convert to safetensors"):
        _load(model_dir, tmp_path)


def test_garbage_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"definitely not gguf" * 100)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))):
        _load(bad, tmp_path)


# -- sharded checkpoints -----------------------------------------------------------------------
def test_missing_shard(model_dir, tmp_path):
    shard = _shard_of(model_dir, "model.layers.1.mlp.down_proj.weight")
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: .*{re.escape(shard.name)}"):
        _load(model_dir, tmp_path)


@pytest.mark.parametrize("cut", ["half", "last bytes"])
def test_truncated_shard(model_dir, tmp_path, cut):
    shard = _shard_of(model_dir, "model.layers.2.self_attn.q_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-3])
    with pytest.raises(CheckpointError, match=re.escape(shard.name) + ".*truncated or corrupt"):
        _load(model_dir, tmp_path)


def test_truncated_single_file_checkpoint(tiny_models, tmp_path):
    """An unsharded model.safetensors (no index) is validated the same way."""
    from tiny import save_tiny
    d = save_tiny("llama", tmp_path / "single", shard="10GB")
    assert not (d / "model.safetensors.index.json").exists()
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        _load(d, tmp_path)


@pytest.mark.parametrize("text, why", [("{oops", "Expecting"), ('{"metadata": {}}', "weight_map"),
                                       ('{"weight_map": [1]}', "weight_map")])
def test_bad_index(model_dir, tmp_path, text, why):
    (model_dir / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"bad safetensors index .*index\.json.*{why}"):
        _load(model_dir, tmp_path)


# -- architectures and weights -----------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["bert", "t5", "foo"])
def test_unknown_architecture(model_dir, tmp_path, model_type):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = model_type
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"'{model_type}'"):
        _load(model_dir, tmp_path)


def _resave(shard, edit):
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_weight_missing_from_checkpoint(model_dir, tmp_path, offload):
    name = "model.layers.2.mlp.up_proj.weight"
    _resave(_shard_of(model_dir, name), lambda t: t.pop(name))
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{re.escape(name)}.*missing"):
        _load(model_dir, tmp_path, offload=offload)


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_weight_in_index_but_not_in_shard(model_dir, tmp_path, offload):
    name = "model.layers.3.self_attn.o_proj.weight"
    _resave(_shard_of(model_dir, name), lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        _load(model_dir, tmp_path, offload=offload)
    assert _files_under(tmp_path / "offload") == []           # nothing half-written is left


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_weight_with_wrong_shape(model_dir, tmp_path, offload):
    name = "model.layers.1.mlp.gate_proj.weight"

    def shrink(t):
        t[name] = t[name][:-1].contiguous()
    _resave(_shard_of(model_dir, name), shrink)
    want = rf"{re.escape(name)}.*shape \(95, 64\).*expects \(96, 64\)"
    with pytest.raises(CheckpointError, match=want):
        _load(model_dir, tmp_path, offload=offload)
    assert _files_under(tmp_path / "offload") == []


# -- budgets, offload, device --------------------------------------------------------------------
@pytest.mark.parametrize("size, nbytes", [("24GB", 24 * 10**9), ("24GiB", 24 * 2**30), (2**31, 2**31)])
def test_budget_accepted(tiny_models, tmp_path, size, nbytes):
    with _load(tiny_models("llama"), tmp_path, max_cpu_memory=size) as m:
        assert m.plan.budgets.device == nbytes          # on a CPU device, the RAM budget is the device's


@pytest.mark.parametrize("param", ["max_cpu_memory", "max_gpu_memory", "max_disk"])
@pytest.mark.parametrize("size", ["abc", "-1GiB", "24XB", -5, "", True])
def test_budget_rejected(tiny_models, tmp_path, param, size):
    with pytest.raises(ValueError, match=f"{param}=.*not a valid size"):
        _load(tiny_models("llama"), tmp_path, **{param: size})


@pytest.mark.parametrize("size", ["1KB", 300_000])
def test_budget_too_small_says_how_much_is_needed(tiny_models, tmp_path, size):
    with pytest.raises(ValueError, match=r"too small.*at least [\d.]+ [KMG]iB is needed"):
        _load(tiny_models("llama"), tmp_path, max_cpu_memory=size)


@pytest.mark.parametrize("offload, match", [
    ("gpu-ish", r"offload mode 'gpu-ish' is not one of"),
    (5, r"offload mode 5 is not one of"),
    ({"layers.99": "disk"}, r"offload key 'layers\.99' matches no block"),
    ({"layers.*": "tape"}, r"offload\['layers\.\*'\] = 'tape': tier must be one of"),
    ({"head": "gpu"}, r"offload\['head'\] = 'gpu': tier must be one of \('cpu', 'disk'\) on cpu"),
])
def test_bad_offload(tiny_models, tmp_path, offload, match):
    with pytest.raises(ValueError, match=match):
        _load(tiny_models("llama"), tmp_path, offload=offload)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"], ids=["plain", "index"])  # an id "cuda" = marker
def test_cuda_without_a_gpu(tiny_models, tmp_path, device):
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA GPU"):
        _load(tiny_models("llama"), tmp_path, device=device)


# -- generation arguments ----------------------------------------------------------------------
BAD_ARGS = [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
]


@pytest.mark.parametrize("kw, name", BAD_ARGS)
def test_bad_generation_args(llm, kw, name):
    with pytest.raises(ValueError, match=name):
        llm.generate("hello", **kw)
    with pytest.raises(ValueError, match=name):
        list(llm.stream("hello", **kw))
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(ValueError, match=name):
        llm.generate_ids(torch.tensor([[1, 2, 3]]), kw.pop("max_new_tokens"), **kw)


def test_bad_prompts(llm):
    with pytest.raises(TypeError, match="prompt must be a string.*got int"):
        llm.generate(5)
    with pytest.raises(TypeError, match="prompt must be a string.*got int"):
        llm.generate(["ok", 5])
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate("")
    with pytest.raises(ValueError, match=r"empty prompt: row\(s\) \[0\]"):
        llm.generate(["", "not empty"])
    with pytest.raises(ValueError, match="stop must be a non-empty string"):
        llm.generate("hello", stop="")
    with pytest.raises(TypeError, match="temprature"):
        list(llm.stream("hello", temprature=0.5))
    assert llm.generate([]) == []
    assert llm.generate("hello", max_new_tokens=0) == ""


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_past_a_learned_position_table(tiny_models, tmp_path, arch):
    """Models with a learned position table (256 rows here) refuse to run past it, clearly."""
    with _load(tiny_models(arch), tmp_path) as m:
        ids = torch.randint(0, 256, (1, 250))
        assert m.generate_ids(ids, 6).shape == (1, 6)          # exactly 256 positions: fine
        with pytest.raises(ValueError, match=r"= 257 exceeds the 256 positions.*max_position_emb"):
            m.generate_ids(ids, 7)


def test_calibration_that_is_not_a_file(tmp_path):
    """A str calibration is a file path: a missing one, or text passed as a str (too long to be a
    path on Linux), is named in a ValueError that says how to pass text, not an OSError."""
    from runtime.quant.calib_data import calibration_text
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "nope.txt")) + ".*list of strings"):
        calibration_text(str(tmp_path / "nope.txt"))
    text = "Once upon a time there was a model. " * 400
    with pytest.raises(ValueError, match=r"'Once upon a time.*\.\.\.' does not exist.*list of strings"):
        calibration_text(text)
    assert calibration_text([text]) == text
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    assert calibration_text(tmp_path / "calib.txt") == text
