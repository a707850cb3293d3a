"""User-facing generation on tiny random models: batches, sampling, stops, streaming, chat."""
import json
import shutil

import pytest
import torch

import exa
from tiny import CONFIGS, reference

PAD = 258            # the tiny tokenizer's <pad>; prompts below never contain it
EOS = 257


def _open(path, tmp_path, **kw):
    return exa.Inference(str(path), device="cpu", progress=False, offload_dir=str(tmp_path), **kw)


@pytest.fixture(scope="module")
def llm(tiny_models, tmp_path_factory):
    with _open(tiny_models("llama"), tmp_path_factory.mktemp("off")) as m:
        yield m


@pytest.fixture(scope="module")
def greedy_text(llm):
    return llm.generate("hello world", max_new_tokens=24)


def _prompts(seed=3):
    """Two prompts of different lengths (token ids in 0..255, no <pad>)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g) for n in (9, 4)]


def _left_pad(prompts):
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), PAD)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    return ids, mask


def _last_new(seq):
    """Index of the last token of ``seq`` that occurs there for the first time (> 0)."""
    k = max(i for i, t in enumerate(seq) if t not in seq[:i])
    assert k > 0, seq
    return k


def _hf_greedy(ref, prompt, n):
    """transformers' greedy continuation of one unpadded prompt (``n`` tokens, no early stop)."""
    out = ref.generate(prompt[None], attention_mask=torch.ones_like(prompt[None]), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=PAD)
    return out[0, len(prompt):]


# -- greedy batches against transformers -------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_left_padded_batch_matches_single_prompt_transformers(arch, offload, tiny_models, tmp_path):
    path = tiny_models(arch)
    ref = reference(path)
    prompts = _prompts()
    ids, mask = _left_pad(prompts)
    with _open(path, tmp_path, offload=offload) as m:
        got = m.generate_ids(ids, 10, attention_mask=mask)
    assert got.shape == (2, 10)
    with torch.no_grad():
        for row, p in zip(got, prompts):
            assert row.tolist() == _hf_greedy(ref, p, 10).tolist(), (arch, offload)


def test_text_batch_equals_one_prompt_at_a_time(llm):
    prompts = ["The quick brown fox", "Hi", "a much longer prompt than the others, padded least"]
    one_by_one = [llm.generate(p, max_new_tokens=12) for p in prompts]
    assert llm.generate(prompts, max_new_tokens=12) == one_by_one
    assert llm.generate(tuple(prompts), max_new_tokens=12) == one_by_one


# -- sampling ----------------------------------------------------------------------------------
def test_sampling_is_reproducible_and_depends_on_the_seed(llm):
    kw = dict(max_new_tokens=24, temperature=1.0)
    a = llm.generate("hello world", seed=1, **kw)
    assert llm.generate("hello world", seed=1, **kw) == a
    others = {llm.generate("hello world", seed=s, **kw) for s in (2, 3, 4)}
    assert len(others | {a}) > 1


def test_sampling_ids_reproducible_per_seed(llm):
    ids = _prompts()[0][None]
    a = llm.generate_ids(ids, 16, temperature=1.5, seed=7)
    assert torch.equal(llm.generate_ids(ids, 16, temperature=1.5, seed=7), a)
    assert not torch.equal(llm.generate_ids(ids, 16, temperature=1.5, seed=8), a)


def test_degenerate_sampling_is_greedy(llm, greedy_text):
    ids = _prompts()[0][None]
    greedy = llm.generate_ids(ids, 12)
    assert torch.equal(llm.generate_ids(ids, 12, temperature=5.0, top_k=1, seed=0), greedy)
    assert torch.equal(llm.generate_ids(ids, 12, temperature=5.0, top_p=1e-6, seed=0), greedy)
    hot = dict(max_new_tokens=24, temperature=2.0, seed=3)
    assert llm.generate("hello world", top_k=1, **hot) == greedy_text
    assert llm.generate("hello world", top_p=1e-9, **hot) == greedy_text


# -- stopping ----------------------------------------------------------------------------------
def test_stop_string_cuts_the_text(llm, greedy_text):
    assert len(greedy_text) >= 8, greedy_text
    stop = greedy_text[5:7]
    cut = greedy_text.find(stop)
    assert llm.generate("hello world", max_new_tokens=24, stop=stop) == greedy_text[:cut]
    # the earliest of several stop strings wins; a stop that never appears changes nothing
    never = "\u2603never\u2603"
    assert llm.generate("hello world", max_new_tokens=24, stop=[never, stop]) == greedy_text[:cut]
    assert llm.generate("hello world", max_new_tokens=24, stop=never) == greedy_text


def test_eos_stops_early(llm):
    ids = _prompts()[0][None]
    greedy = llm.generate_ids(ids, 12)[0].tolist()
    k = _last_new(greedy)
    got = llm.generate_ids(ids, 12, eos_token_id=greedy[k])[0].tolist()
    assert got == greedy[:k + 1]


def test_eos_in_a_batch_fills_finished_rows(llm):
    ids, mask = _left_pad(_prompts())
    greedy = llm.generate_ids(ids, 12, attention_mask=mask)
    row0, row1 = greedy.tolist()
    k = max(i for i, t in enumerate(row0) if t not in row0[:i] and t not in row1)
    got = llm.generate_ids(ids, 12, attention_mask=mask, eos_token_id=row0[k])
    assert got.shape == (2, 12)
    assert got[0].tolist() == row0[:k + 1] + [row0[k]] * (11 - k)
    assert torch.equal(got[1], greedy[1])


def test_text_generation_stops_at_eos_from_generation_config(tiny_models, tmp_path):
    """generation_config.json's eos ids end the text (chat models list their end-of-turn there)."""
    d = shutil.copytree(tiny_models("llama"), tmp_path / "model")
    with _open(d, tmp_path / "off") as m:
        tok = m.tokenizer
        new = m.generate_ids(tok("hello world", return_tensors="pt").input_ids, 24)[0].tolist()
        k = _last_new(new)
        full = m.generate("hello world", max_new_tokens=24)
    assert full == tok.decode(new, skip_special_tokens=True)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS, new[k]]
    (d / "generation_config.json").write_text(json.dumps(gen))
    with _open(d, tmp_path / "off") as m:
        want = tok.decode(new[:k], skip_special_tokens=True)
        assert m.generate("hello world", max_new_tokens=24) == want
        assert "".join(m.stream("hello world", max_new_tokens=24)) == want
    (d / "generation_config.json").write_text("{broken")
    with pytest.warns(UserWarning, match="generation_config.json"):
        m = _open(d, tmp_path / "off")
    with m:
        assert m.generate("hello world", max_new_tokens=24) == full


# -- stream, __call__, run ---------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(temperature=1.0, seed=5), dict(stop="STOP")])
def test_stream_pieces_join_to_generate(llm, greedy_text, kw):
    if kw.get("stop") == "STOP":
        kw["stop"] = greedy_text[6:9]          # a stop string that does occur, spanning tokens
    pieces = list(llm.stream("hello world", max_new_tokens=24, **kw))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == llm.generate("hello world", max_new_tokens=24, **kw)
    assert len(pieces) > 1


def test_call_and_run_equal_generate(llm, greedy_text):
    assert llm("hello world", 24) == greedy_text
    assert llm.run("hello world", max_new_tokens=24) == greedy_text
    assert llm(["hello world", "Hi"], 24) == [greedy_text, llm.generate("Hi", 24)]


# -- chat ----------------------------------------------------------------------------------------
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_chat_template_is_applied(tiny_models, tmp_path):
    with _open(tiny_models("llama"), tmp_path) as m:
        with pytest.raises(ValueError, match="chat template"):
            m.generate("hi", chat=True)
        with pytest.raises(ValueError, match="chat template"):
            m.generate([{"role": "user", "content": "hi"}])
        m.tokenizer.chat_template = TEMPLATE
        want = m.generate("[user]hi\n[assistant]", max_new_tokens=10)
        assert m.generate("hi", max_new_tokens=10, chat=True) == want
        assert m.generate([{"role": "user", "content": "hi"}], max_new_tokens=10) == want
        assert m.generate("hi", max_new_tokens=10) != want          # chat=None: plain text
        chats = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "be brief"},
                                                        {"role": "user", "content": "hello"}]]
        assert m.generate(chats, max_new_tokens=10) == [
            want, m.generate("[system]be brief\n[user]hello\n[assistant]", max_new_tokens=10)]
        assert "".join(m.stream("hi", max_new_tokens=10, chat=True)) == want


def test_chat_template_from_tokenizer_config(tiny_models, tmp_path):
    """A template saved with the model (tokenizer_config.json) is picked up."""
    d = shutil.copytree(tiny_models("llama"), tmp_path / "model")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with _open(d, tmp_path / "off") as m:
        assert m.generate([{"role": "user", "content": "hi"}], max_new_tokens=6) == \
            m.generate("[user]hi\n[assistant]", max_new_tokens=6)


def test_requests_beyond_the_planned_kv_cache_are_refused(tiny_models, tmp_path):
    """The plan reserves batch_size x max_context KV tokens; a bigger request must not run past it."""
    import exa
    with exa.Inference(str(tiny_models("llama")), offload="none", device="cpu", max_context=32,
                       batch_size=2, progress=False) as llm:
        ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        assert llm.generate_ids(ids, max_new_tokens=16).shape == (1, 16)           # exactly 32
        assert llm.generate_ids(ids.repeat(4, 1), max_new_tokens=0).shape[0] == 4  # 64 = 2 x 32
        with pytest.raises(ValueError, match="max_context"):
            llm.generate_ids(ids, max_new_tokens=60)
        with pytest.raises(ValueError, match="batch_size"):
            llm.generate_ids(ids.repeat(3, 1), max_new_tokens=8)


def test_last_stats_count_the_generated_tokens(tiny_models):
    import exa
    with exa.Inference(str(tiny_models("llama")), offload="none", device="cpu", progress=False) as llm:
        llm.generate(["ab", "abcd"], max_new_tokens=5)
        st = llm.last_stats
        assert st["prompt_tokens"] == 6 and st["new_tokens"] <= 10 and st["new_tokens"] > 0
        assert 0 < st["first_token_s"] <= st["total_s"]
