"""benchmarks/quant_sensitivity.py on a tiny model: its fully quantized score is the engine's own."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

import exa
from runtime.perplexity import perplexity_from_nll, sliding_nll
from test_gptq import _one_thread, _text  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import quant_sensitivity  # noqa: E402


def test_scores_match_the_engine_and_cover_every_layer_and_kind(tiny_models, tmp_path):
    fp = tiny_models("llama")
    ckpt = exa.Quantize(str(fp), quant_type="int", bits=2, group_size=32, compute_dtype=torch.float32).save(tmp_path / "q", progress=False)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(_text(7, 6)))
    args = argparse.Namespace(ckpt=str(ckpt), fp=str(fp), text=str(text), max_tokens=300, max_length=128,
                              stride=64, device="cpu", total_only=False)
    res = quant_sensitivity.main(args)
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(fp))(text.read_text(), return_tensors="pt")["input_ids"][0][:300]
    for path, key in ((ckpt, "quantized"), (fp, "baseline")):
        with exa.Inference(str(path), offload="none", device="cpu", progress=False) as llm:
            total, n = sliding_nll(lambda w: llm.engine.forward(w), ids, 128, 64, progress=False)
        assert res[key] == pytest.approx(perplexity_from_nll(total, n), rel=1e-4), key
    assert abs(res["quantized"] / res["baseline"] - 1) > 0.01         # 2-bit: visibly another model
    assert all(v != res["quantized"] for v in [*res["layers"].values(), *res["kinds"].values()])
    assert sorted(res["layers"]) == [0, 1, 2, 3]
    assert set(res["kinds"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(torch.isfinite(torch.tensor(v)) for v in [*res["layers"].values(), *res["kinds"].values()])
