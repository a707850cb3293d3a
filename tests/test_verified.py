"""Fast loading: shards hashed once (runtime/verified.py), few staging buffers, populated memory."""
import hashlib
import os

import pytest
import torch

import exa
from runtime import fastload
from runtime.tiers import populated_empty
from runtime.verified import Verified

IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def saved(tiny_models, tmp_path):
    return exa.Quantize(str(tiny_models("llama")), quant_type="int4", group_size=32,
                        compute_dtype=torch.float32).save(tmp_path / "q4")


@pytest.fixture
def hashes(monkeypatch):
    """Counts the sha256 objects fastload makes (one per shard it hashes)."""
    n, real = {"calls": 0}, hashlib.sha256

    def counting(*a):
        n["calls"] += 1
        return real(*a)
    monkeypatch.setattr(fastload.hashlib, "sha256", counting)
    return n


def _load(out, **kw):
    with exa.Inference(str(out), device="cpu", progress=False, **kw) as llm:
        return llm.logits(IDS)


def test_second_load_skips_hashing_and_gives_the_same_logits(saved, hashes):
    first = _load(saved)
    assert hashes["calls"] > 0
    hashes["calls"] = 0
    assert torch.equal(_load(saved), first)
    assert hashes["calls"] == 0


def test_a_rewritten_shard_is_hashed_again_and_caught(saved, hashes):
    _load(saved)
    shard = sorted((saved / "blocks").glob("*layers.1*"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x55
    shard.write_bytes(bytes(data))                  # a new mtime: no longer the verified file
    with pytest.raises(ValueError, match=shard.name):
        _load(saved)


def test_policies_always_and_never(saved, hashes, monkeypatch):
    _load(saved)
    shard = sorted((saved / "blocks").glob("*layers.1*"))[0]
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x55
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))   # corrupted in place, same identity
    _load(saved)                                    # "once" trusts the earlier check: documented
    monkeypatch.setenv("EXA_VERIFY", "always")
    with pytest.raises(ValueError, match=shard.name):
        _load(saved)
    monkeypatch.setenv("EXA_VERIFY", "never")
    hashes["calls"] = 0
    _load(saved)
    assert hashes["calls"] == 0
    monkeypatch.setenv("EXA_VERIFY", "sometimes")
    with pytest.raises(ValueError, match="EXA_VERIFY"):
        _load(saved)


def test_record_is_merged_and_survives_a_broken_file(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x")
    v = Verified(tmp_path, mode="once")
    assert v.needed(f, "s1")
    v.mark(f, "s1")
    v.save()
    assert not Verified(tmp_path, mode="once").needed(f, "s1")
    assert Verified(tmp_path, mode="once").needed(f, "other")
    (tmp_path / "verified.json").write_text("{not json")
    assert Verified(tmp_path, mode="once").needed(f, "s1")       # unreadable record: hash again
    assert Verified(tmp_path, mode="always").needed(f, "s1")
    assert not Verified(tmp_path, mode="never").needed(f, "s1")


def test_staging_buffers_are_capped_and_order_kept(saved, monkeypatch):
    from runtime.checkpoint import open_checkpoint
    from runtime.engine import plan_model
    from runtime.loader import pack_block, resolve_sources
    ckpt = open_checkpoint(str(saved))
    planned = plan_model(ckpt.config, device=torch.device("cpu"), dtype=torch.float32, offload="none",
                         quant=ckpt.quant, skip_modules=ckpt.skip_modules)
    resolve_sources(planned.model, planned.blocks, ckpt, planned.qmods)
    made = []
    real = fastload.aligned_empty
    monkeypatch.setattr(fastload, "MAX_STAGING", 2)
    monkeypatch.setattr(fastload, "aligned_empty", lambda *a, **k: made.append(1) or real(*a, **k))
    got = [(b.name, buf[: b.nbytes].clone())
           for b, buf in fastload.load_blocks(ckpt, planned.blocks, lambda b: None, readers=4)]
    assert [n for n, _ in got] == [b.name for b in planned.blocks]
    assert all(torch.equal(buf, pack_block(ckpt, b)) for (_, buf), b in zip(got, planned.blocks))
    assert len(made) == 2
    ckpt.close()


def test_populated_memory_is_zeroed_and_outlives_its_base():
    t = populated_empty((64 << 20) + 4096 + 7, threads=3)
    assert t.numel() == (64 << 20) + 4096 + 7 and t.data_ptr() % 4096 == 0
    assert int(t[:: 1 << 16].sum()) == 0 and int(t[-7:].sum()) == 0
    view = t[100:200]
    del t
    view.fill_(9)
    assert int(view.sum()) == 900
    assert populated_empty(0).numel() == 0


def test_unhashed_blocks_read_in_pieces_match(saved, monkeypatch):
    want = _load(saved)
    monkeypatch.setattr(fastload, "SPLIT", 8192)
    monkeypatch.setenv("EXA_VERIFY", "never")
    assert torch.equal(_load(saved), want)
    shard = sorted((saved / "blocks").glob("*layers.0*"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=shard.name):
        _load(saved)
