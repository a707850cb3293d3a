"""The ``exa`` command line: plan without weights, run with streaming, clean errors."""
import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

import exa
from exa.cli import main

SUMMARY = re.compile(r"^exa: (\d+) tokens in [\d.]+ s \([\d.]+ tok/s;.*load [\d.]+ s\)$", re.M)


def _tiers(table: str) -> set[str]:
    """Tier column of the block rows of a placement table."""
    rows = table.split("  block ")[1].split("Device memory")[0].splitlines()[1:]
    return {row.split()[1] for row in rows if row.strip()}


def _fail(capsys, argv) -> str:
    """Run ``exa argv`` expecting exit status 2; return stderr."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "exa: error: " in err and "Traceback" not in err
    return err


@pytest.fixture
def no_weights(monkeypatch):
    """Make any attempt to open a checkpoint or a weight file fail: planning needs the config only.

    (Exa's own entry points are patched, not safetensors': a module imported during the test
    would keep the patched function for the rest of the session.)
    """
    def refuse(*a, **k):
        raise AssertionError("exa plan read a weight file")
    for name in ("open_checkpoint", "_safe_open", "_open_dir", "_open_gguf"):
        monkeypatch.setattr(f"runtime.checkpoint.{name}", refuse)
    monkeypatch.setattr("runtime.loader.pack_block", refuse)


@pytest.mark.parametrize("argv, tiers", [
    (["--device", "cpu"], {"cpu"}),
    (["--device", "cpu", "--offload", "disk", "--max-cpu-memory", "1GiB"], {"cpu", "disk"}),
    (["--device", "cuda", "--max-gpu-memory", "1GiB", "--offload", "cpu", "--dtype", "fp16"], {"gpu", "cpu"}),
])
def test_plan_prints_table_with_every_tier_and_tok_s(argv, tiers, tiny_models, capsys, no_weights):
    assert main(["plan", str(tiny_models("llama")), *argv]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Model: ") and "llama: 4 layers, hidden 64" in out
    assert _tiers(out) == tiers
    assert re.search(r"decode\s+[\d,.]+ tok/s", out) and re.search(r"prefill\s+[\d,.]+ tok/s", out)


def test_plan_for_cuda_works_without_a_gpu(tiny_models, capsys, no_weights):
    assert main(["plan", str(tiny_models("llama")), "--device", "cuda", "--max-gpu-memory", "1GiB",
                 "--batch-size", "2", "--max-context", "256"]) == 0
    out = capsys.readouterr().out
    assert "Placement on cuda" in out and "of 1.00 GiB budget" in out and "batch 2 x 256 tokens" in out
    assert "tok/s" in out
    if not torch.cuda.is_available():
        assert "no GPU on this machine" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_plan_for_cuda_without_a_gpu_needs_a_budget(tiny_models, capsys):
    err = _fail(capsys, ["plan", str(tiny_models("llama")), "--device", "cuda"])
    assert "max_gpu_memory" in err


def test_run_streams_the_same_text_as_generate(tiny_models, tmp_path, capsys):
    path = str(tiny_models("llama"))
    with exa.Inference(path, device="cpu", progress=False) as llm:
        want = llm.generate("Hello", max_new_tokens=6)
    assert main(["run", path, "--prompt", "Hello", "--max-new-tokens", "6", "--device", "cpu",
                 "--offload", "disk", "--offload-dir", str(tmp_path), "--show-plan"]) == 0
    out, err = capsys.readouterr()
    assert out == want + "\n"                       # stdout holds the text only
    assert re.search(r"layers\.0-3\s+disk\s+streamed", err)
    m = SUMMARY.search(err)
    assert m and 0 < int(m.group(1)) <= 6, err


def test_run_forwards_sampling_and_stop(tiny_models, capsys):
    path = str(tiny_models("llama"))
    argv = ["run", path, "--prompt", "Hi", "--max-new-tokens", "8", "--temperature", "0.9",
            "--top-p", "0.9", "--top-k", "50", "--seed", "3", "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first         # the seed makes sampling repeatable
    text = first.rstrip("\n")
    if len(text) > 1:                               # stop before the second character
        assert main([*argv, "--stop", text[1:]]) == 0
        assert capsys.readouterr().out == text[:1] + "\n"


@pytest.mark.parametrize("cmd", ["plan", "run"])
def test_nonexistent_model_path(cmd, tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")
    extra = ["--prompt", "x"] if cmd == "run" else []
    err = _fail(capsys, [cmd, missing, *extra])
    assert missing in err and "does not exist" in err


@pytest.mark.parametrize("option", ["--max-gpu-memory", "--max-cpu-memory", "--max-disk"])
def test_bad_budget(option, tiny_models, capsys):
    err = _fail(capsys, ["plan", str(tiny_models("llama")), option, "abc"])
    assert option in err and "'abc' is not a size" in err


@pytest.mark.parametrize("argv, words", [
    (["--device", "gpu"], "'gpu' is not a device"),
    (["--offload", "ram"], "invalid choice: 'ram'"),
    (["--max-context", "0"], "'0' is not a whole number"),
    (["--device", "cpu", "--max-cpu-memory", "1MiB"], "too small"),          # PlanError
])
def test_bad_options(argv, words, tiny_models, capsys):
    assert words in _fail(capsys, ["plan", str(tiny_models("llama")), *argv])


def test_unsupported_architecture_and_not_a_model(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "unsupported architecture 'bert'" in _fail(capsys, ["plan", str(tmp_path / "bert")])
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _fail(capsys, ["plan", str(tmp_path / "empty")])
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "neither a model directory nor a .gguf file" in _fail(capsys, ["plan", str(tmp_path / "weights.bin")])


def test_missing_command_and_prompt(capsys):
    _fail(capsys, [])
    assert "--prompt" in _fail(capsys, ["run"])


def test_exa_debug_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("EXA_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main(["plan", str(tmp_path / "missing")])


def test_installed_console_script(tiny_models):
    (script,) = entry_points(group="console_scripts", name="exa")
    assert script.value == "exa.cli:main"
    exe = Path(sys.executable).parent / "exa"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "exa.cli"]
    r = subprocess.run([*cmd, "plan", str(tiny_models("llama")), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "EXA_DEBUG": ""})
    assert r.returncode == 0, r.stderr
    assert "Placement on cpu" in r.stdout and "tok/s" in r.stdout
