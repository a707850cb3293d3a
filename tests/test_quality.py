"""Quantization quality on real weights and real text (SmolLM2-135M-Instruct, lee_background).

A shortened version of benchmarks/quality.py (the first 2,048 tokens), checking the issue's
bars: int8 within 1% of the unquantized perplexity, int4 g32 within 3%, and exa's nf4 within
0.5% of bitsandbytes' own nf4 on the same tokens. The model's weights come from a GGUF Q4_1
file, so int4 g32 with the asymmetric "min" grid (Q4_1's own) must reproduce them; other
4-bit grids lose far more on this small, already-quantized model (see RESULTS.md).
"""
import os
from pathlib import Path

import pytest
import torch

import exa
from runtime.assets import AssetError, default_model_safetensors, lee_background
from runtime.perplexity import perplexity_from_nll, sliding_nll
from runtime.quant.spec import QuantSpec, spec_from_name

pytestmark = pytest.mark.net
TOKENS, WINDOW, STRIDE = 2048, 1024, 512


@pytest.fixture(scope="module")
def data():
    mp = pytest.MonkeyPatch()
    mp.setenv("EXA_CACHE_DIR", str(Path.home() / ".cache" / "exa"))    # assets persist per machine
    try:
        path, text = default_model_safetensors(), lee_background()
    except AssetError as e:
        pytest.skip(f"real weights/text unavailable (package registry unreachable?): {e}")
    finally:
        mp.undo()
    from transformers import AutoTokenizer
    ids = AutoTokenizer.from_pretrained(str(path))(text.read_text(), return_tensors="pt")["input_ids"][0]
    return path, ids[:TOKENS]


def _ppl(path, ids, spec) -> float:
    with exa.Inference(str(path), quantize=spec, offload="none", device="cpu", progress=False) as llm:
        total, n = sliding_nll(lambda w: llm.engine.forward(w), ids, WINDOW, STRIDE, progress=False)
    return perplexity_from_nll(total, n)


@pytest.fixture(scope="module")
def baseline(data):
    return _ppl(*data, None)


@pytest.mark.parametrize("spec,bar", [
    (QuantSpec("int", 8, -1, sym=True), 0.01),                    # int8 weight-only, per channel
    (spec_from_name("int4", group_size=32), 0.03),                # int4 g32 (the source's Q4_1 grid)
], ids=lambda v: getattr(v, "name", str(v)))
def test_quantized_perplexity_within_bar(data, baseline, spec, bar):
    ppl = _ppl(*data, spec)
    assert abs(ppl / baseline - 1) <= bar, (spec.name, ppl, baseline)


def test_llm_int8_within_2_percent(data, baseline):
    """LLM.int8 also quantizes activations (outliers > 6 stay 16-bit): a little more error."""
    ppl = _ppl(*data, spec_from_name("int8"))
    assert abs(ppl / baseline - 1) <= 0.02, (ppl, baseline)


def test_nf4_equals_bitsandbytes_nf4(data):
    bf = pytest.importorskip("bitsandbytes.functional")
    from transformers import AutoModelForCausalLM
    path, ids = data
    ours = _ppl(path, ids, spec_from_name("nf4", group_size=64))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            q, state = bf.quantize_4bit(mod.weight.data, blocksize=64, quant_type="nf4")
            mod.weight.data = bf.dequantize_4bit(q, state)
    with torch.no_grad():
        theirs = perplexity_from_nll(*sliding_nll(lambda w: model(w).logits, ids, WINDOW, STRIDE, progress=False))
    assert abs(ours / theirs - 1) <= 0.005, (ours, theirs)
