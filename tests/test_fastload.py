"""Loading in parallel (runtime/fastload.py) and blocks read in place from files (FileBlocks)."""
import os

import pytest
import torch

import exa
from runtime.tiers import aligned_empty
from runtime.tiers.disk import DiskStoreError
from runtime.tiers.files import FileBlocks

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def _file(tmp_path, data: bytes):
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("direct", [None, False])
def test_file_blocks_read_back_at_aligned_and_odd_offsets(tmp_path, direct):
    data = os.urandom(5 * 4096 + 123)
    p = _file(tmp_path, data)
    blocks = {"a": (p, 0, 4096), "b": (p, 4096, 2 * 4096), "c": (p, 3 * 4096, 2 * 4096 + 123)}
    fb = FileBlocks(blocks, direct=direct)
    for key, (_, off, n) in blocks.items():
        for out in (aligned_empty(n + 4096), torch.empty(n + 1, dtype=torch.uint8)[1:]):   # aligned / not
            fb.read_into(key, out)
            assert bytes(out[:n].numpy()) == data[off:off + n]
    odd = FileBlocks({"x": (p, 5, 1000)}, direct=direct)
    assert not odd.direct
    out = torch.empty(1000, dtype=torch.uint8)
    odd.read_into("x", out)
    assert bytes(out.numpy()) == data[5:1005]
    fb.close()


def test_file_blocks_reject_short_files_and_unknown_keys(tmp_path):
    p = _file(tmp_path, b"x" * 100)
    with pytest.raises(DiskStoreError, match="shorter"):
        FileBlocks({"a": (p, 0, 4096)})
    fb = FileBlocks({"a": (p, 0, 100)})
    with pytest.raises(KeyError, match="'b'"):
        fb.read_into("b", torch.empty(100, dtype=torch.uint8))
    with pytest.raises(ValueError):
        fb.read_into("a", torch.empty(10, dtype=torch.uint8))


@pytest.fixture
def saved(tiny_models, tmp_path):
    path = tiny_models("llama")
    out = exa.Quantize(str(path), quant_type="int4", group_size=32, compute_dtype=torch.float32).save(tmp_path / "q4")
    return path, out


def test_exa_checkpoint_disk_blocks_are_read_in_place(saved, tmp_path):
    path, out = saved
    with exa.Inference(str(out), offload="none", device="cpu", progress=False) as a:
        want, want_tokens = a.logits(IDS), a.generate_ids(IDS[:1], 5)
    off = tmp_path / "offload"
    for place in ("disk", {"layers.0": "disk", "head": "disk"}):
        with exa.Inference(str(out), offload=place, device="cpu", offload_dir=str(off), prefetch_depth=2,
                           progress=False) as b:
            assert isinstance(b.engine.executor.prefetcher.sources["layers.0"].store, FileBlocks)
            assert torch.equal(b.logits(IDS), want)
            assert torch.equal(b.generate_ids(IDS[:1], 5), want_tokens)
    assert not off.exists()                               # no copy of the blocks was written
    times = b.engine.load_times
    assert set(times) >= {"plan", "pin_host_memory", "disk_blocks", "read_blocks", "kernel_warmup"}
    assert all(v >= 0 for v in times.values()) and times["disk_blocks"] > 0


def test_corrupted_disk_block_is_caught_at_load(saved):
    _, out = saved
    shard = sorted((out / "blocks").glob("*layers.1*"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=shard.name):
        exa.Inference(str(out), offload="disk", device="cpu", progress=False)


@pytest.mark.parametrize("which", ["exa", "hf"])
def test_parallel_loader_keeps_block_order_and_falls_back_to_packing(saved, which):
    """Blocks come out in order whatever finishes first; blocks not stored as such are packed."""
    from runtime import fastload
    from runtime.checkpoint import open_checkpoint
    from runtime.engine import plan_model
    from runtime.loader import pack_block, resolve_sources
    ckpt = open_checkpoint(str(saved[0] if which == "hf" else saved[1]))
    planned = plan_model(ckpt.config, device=torch.device("cpu"), dtype=torch.float32, offload="none",
                         quant=getattr(ckpt, "quant", None), skip_modules=getattr(ckpt, "skip_modules", ()))
    resolve_sources(planned.model, planned.blocks, ckpt, planned.qmods)
    got = [(b.name, buf[: b.nbytes].clone())
           for b, buf in fastload.load_blocks(ckpt, planned.blocks, lambda b: None, readers=3)]
    assert [n for n, _ in got] == [b.name for b in planned.blocks]
    for (_, buf), b in zip(got, planned.blocks):
        assert torch.equal(buf, pack_block(ckpt, b))
    direct = [fastload.direct_source(ckpt, b) is not None for b in planned.blocks]
    assert all(direct) if which == "exa" else not any(direct)
    ckpt.close()
