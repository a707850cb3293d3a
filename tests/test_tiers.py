"""Tests for runtime.tiers: aligned allocation, pinned pool, GPU tier, disk block store."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from runtime.tiers import (
    ALIGN,
    DiskStore,
    DiskStoreError,
    DiskStoreWriter,
    GpuTier,
    PinnedPool,
    Tier,
    aligned_empty,
)
from runtime.tiers import _fmt_bytes  # runtime.units.fmt_bytes, or the local stand-in

SIZES = {"a": 1, "b": 4095, "c": 4096, "d": 4097, "e": 100_000, "empty": 0, "f": 3 * 4096 + 17}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rand_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


@pytest.fixture
def blocks() -> dict[str, torch.Tensor]:
    return {k: rand_bytes(n, i + 1) for i, (k, n) in enumerate(SIZES.items())}


@pytest.fixture
def store_dir(tmp_path: Path, blocks: dict[str, torch.Tensor]) -> Path:
    d = tmp_path / "store"
    with DiskStoreWriter(d) as w:
        for k, v in blocks.items():
            w.append(k, v)
        w.finish({"model": "test", "n": len(blocks)})
    return d


# -- aligned_empty ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 123_457])
@pytest.mark.parametrize("align", [64, 4096, 8192])
def test_aligned_empty(n: int, align: int) -> None:
    t = aligned_empty(n, align)
    assert t.dtype == torch.uint8 and t.dim() == 1 and t.device.type == "cpu"
    assert t.data_ptr() % align == 0
    assert t.numel() == -(-n // align) * align
    t.fill_(7)  # the whole length is writable


def test_aligned_empty_pin_without_cuda_is_plain() -> None:
    t = aligned_empty(10_000, pin=True)
    assert t.data_ptr() % ALIGN == 0 and t.numel() == 3 * ALIGN
    if not torch.cuda.is_available():
        assert not t.is_pinned()


def test_aligned_empty_rejects_bad_args() -> None:
    with pytest.raises(ValueError):
        aligned_empty(-1)
    with pytest.raises(ValueError):
        aligned_empty(10, align=3000)


# -- PinnedPool ------------------------------------------------------------------------------


def test_pinned_pool_alloc_alignment_and_chunking() -> None:
    pool = PinnedPool(chunk_bytes=64 * 1024, pin=False)
    views = [pool.alloc(n) for n in (1, 4095, 4097, 100, 50_000)]
    for v, n in zip(views, (1, 4095, 4097, 100, 50_000)):
        assert v.data_ptr() % ALIGN == 0 and v.numel() == n
    assert pool.used == ALIGN * (1 + 1 + 2 + 1 + 13)
    assert pool.reserved == 2 * 64 * 1024  # 5 pages in chunk 1; 13 do not fit its tail
    big = pool.alloc(200_000)  # larger than a chunk: a chunk of its own
    assert big.numel() == 200_000 and big.data_ptr() % ALIGN == 0
    assert pool.reserved == 2 * 64 * 1024 + 200_704
    # views never overlap
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel()) for v in views + [big])
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    pool.alloc(100)  # fits in the first chunk's tail (first fit)
    assert pool.reserved == 2 * 64 * 1024 + 200_704


def test_pinned_pool_put_get_round_trip(blocks: dict[str, torch.Tensor]) -> None:
    pool = PinnedPool(chunk_bytes=32 * 1024, pin=False)
    assert isinstance(pool, Tier)
    for k, v in blocks.items():
        pool.put(k, v)
    for k, v in blocks.items():
        assert k in pool and pool.nbytes(k) == v.numel()
        got = pool.get(k)
        assert got.data_ptr() % ALIGN == 0 or v.numel() == 0
        assert torch.equal(got, v)
        out = torch.zeros(v.numel() + 5, dtype=torch.uint8)
        pool.read_into(k, out)
        assert torch.equal(out[: v.numel()], v)
    # same-size overwrite is in place; a different size is refused
    ptr = pool.get("e").data_ptr()
    pool.put("e", rand_bytes(100_000, 99))
    assert pool.get("e").data_ptr() == ptr and torch.equal(pool.get("e"), rand_bytes(100_000, 99))
    with pytest.raises(ValueError, match="'e'"):
        pool.put("e", rand_bytes(10, 1))
    with pytest.raises(KeyError):
        pool.get("nope")
    with pytest.raises(ValueError):
        pool.read_into("e", torch.empty(10, dtype=torch.uint8))


def test_pinned_pool_budget_error() -> None:
    pool = PinnedPool(budget=3 * ALIGN, chunk_bytes=1 << 20, pin=False)
    pool.put("x", rand_bytes(2 * ALIGN, 1))  # chunk clamped to the budget
    assert pool.reserved == 3 * ALIGN
    pool.put("y", rand_bytes(100, 2))
    with pytest.raises(MemoryError) as e:
        pool.put("layer.7", rand_bytes(5000, 3))
    msg = str(e.value)
    assert "budget" in msg and "layer.7" in msg
    assert _fmt_bytes(3 * ALIGN) in msg and _fmt_bytes(5000) in msg
    assert "layer.7" not in pool and pool.reserved == 3 * ALIGN


def test_pinned_pool_reserve() -> None:
    pool = PinnedPool(chunk_bytes=16 * ALIGN, pin=False)
    sizes = [5 * ALIGN + 1, 7 * ALIGN, 3 * ALIGN, 20 * ALIGN, 100]
    pool.reserve(sizes, progress=False)
    reserved = pool.reserved
    assert reserved == sum(-(-s // ALIGN) * ALIGN for s in sizes)  # packed exactly
    for i, s in enumerate(sizes):
        pool.put(f"b{i}", rand_bytes(s, i))
    assert pool.reserved == reserved  # nothing allocated after the reservation
    pool.reserve(40 * ALIGN + 1, progress=True)
    assert pool.reserved == reserved + 41 * ALIGN
    with pytest.raises(MemoryError, match="budget"):
        PinnedPool(budget=ALIGN, pin=False).reserve(2 * ALIGN)


# -- GpuTier ---------------------------------------------------------------------------------


def _gpu_tier_round_trip(device: str, blocks: dict[str, torch.Tensor]) -> None:
    tier = GpuTier(device)
    assert isinstance(tier, Tier)
    for k, v in blocks.items():
        tier.put(k, v)
    assert tier.used == sum(v.numel() for v in blocks.values())
    for k, v in blocks.items():
        got = tier.get(k)
        assert got.device.type == torch.device(device).type
        assert torch.equal(got.cpu(), v) and tier.nbytes(k) == v.numel()
        out = torch.empty(v.numel() + 3, dtype=torch.uint8)
        tier.read_into(k, out)
        assert torch.equal(out[: v.numel()], v)
    tier.free("e")
    assert "e" not in tier and tier.used == sum(v.numel() for k, v in blocks.items() if k != "e")
    tier.put("a", rand_bytes(10, 5))  # replace
    assert tier.nbytes("a") == 10


def test_gpu_tier_logic_on_cpu(blocks: dict[str, torch.Tensor]) -> None:
    _gpu_tier_round_trip("cpu", blocks)


@pytest.mark.cuda
@cuda
def test_gpu_tier_cuda(blocks: dict[str, torch.Tensor]) -> None:
    _gpu_tier_round_trip("cuda", blocks)


@pytest.mark.cuda
@cuda
def test_pinned_memory_on_cuda() -> None:
    t = aligned_empty(600 * 1024 + 1, pin=True)
    assert t.is_pinned() and t.data_ptr() % ALIGN == 0
    pool = PinnedPool(chunk_bytes=1 << 20)
    assert pool.pinned
    pool.put("x", rand_bytes(5000, 1))
    assert pool.get("x").is_pinned()
    gpu = GpuTier("cuda")
    gpu.put("x", pool.get("x"), non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(gpu.get("x").cpu(), rand_bytes(5000, 1))


@pytest.mark.cuda
@cuda
def test_disk_to_pinned_to_gpu(store_dir: Path, blocks: dict[str, torch.Tensor]) -> None:
    store, pool, gpu = DiskStore.open(store_dir), PinnedPool(chunk_bytes=1 << 20), GpuTier("cuda")
    for k, v in blocks.items():
        staging = pool.alloc(store.padded_nbytes(k))
        store.read_into(k, staging)  # O_DIRECT when the filesystem allows it
        gpu.put(k, staging[: v.numel()], non_blocking=True)
    torch.cuda.synchronize()
    for k, v in blocks.items():
        assert torch.equal(gpu.get(k).cpu(), v)
    for _ in range(20):  # registrations are released with the memory (no leak, no error)
        assert aligned_empty(8 << 20, pin=True).is_pinned()


# -- DiskStore -------------------------------------------------------------------------------


def test_disk_store_layout(store_dir: Path, blocks: dict[str, torch.Tensor]) -> None:
    assert sorted(os.listdir(store_dir)) == ["blocks.bin", "index.json"]
    index = json.loads((store_dir / "index.json").read_text())
    assert index["version"] == 1 and index["meta"] == {"model": "test", "n": len(blocks)}
    assert index["file_size"] == (store_dir / "blocks.bin").stat().st_size
    assert index["file_size"] % ALIGN == 0
    for k, e in index["blocks"].items():
        assert e["offset"] % ALIGN == 0 and e["nbytes"] == blocks[k].numel()
    assert DiskStore.exists(store_dir) and not DiskStore.exists(store_dir / "nope")


@pytest.mark.parametrize("direct", [None, False])
def test_disk_store_read_back(store_dir: Path, blocks: dict[str, torch.Tensor], direct) -> None:
    with DiskStore.open(store_dir, direct=direct) as store:
        assert isinstance(store, Tier)
        if direct is False:
            assert not store.direct
        assert store.keys() == list(blocks) and store.meta["model"] == "test"
        for k, v in blocks.items():
            n = v.numel()
            assert k in store and store.nbytes(k) == n
            assert store.padded_nbytes(k) == -(-n // ALIGN) * ALIGN
            aligned = aligned_empty(store.padded_nbytes(k)).fill_(0xAB)
            store.read_into(k, aligned)
            assert torch.equal(aligned[:n], v)
            if store.direct and n:  # the O_DIRECT path also writes the zero padding
                assert not aligned[n:].any()
            unaligned = aligned_empty(n + ALIGN + 8)[3 : 3 + n + 1]  # odd address
            store.read_into(k, unaligned)
            assert torch.equal(unaligned[:n], v)
            short = torch.empty(n, dtype=torch.uint8)  # exactly nbytes: plain read
            store.read_into(k, short)
            assert torch.equal(short, v)
            store.verify(k)
        with pytest.raises(ValueError):
            store.read_into("e", torch.empty(10, dtype=torch.uint8))
        with pytest.raises(KeyError):
            store.read_into("nope", torch.empty(10, dtype=torch.uint8))
        with pytest.raises(NotImplementedError):
            store.get("a")


def test_disk_store_forced_plain_after_open(store_dir: Path, blocks) -> None:
    store = DiskStore.open(store_dir)
    store.direct = False  # the documented switch to force plain reads
    out = aligned_empty(store.padded_nbytes("e"))
    store.read_into("e", out)
    assert torch.equal(out[: 100_000], blocks["e"])
    store.close()
    store.close()


def test_disk_store_concurrent_reads(store_dir: Path, blocks) -> None:
    store = DiskStore.open(store_dir)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(50):
                k = list(blocks)[(seed + i) % len(blocks)]
                out = aligned_empty(store.padded_nbytes(k))
                if i % 2:
                    out = aligned_empty(store.padded_nbytes(k) + 16)[1:]
                store.read_into(k, out)
                assert torch.equal(out[: blocks[k].numel()], blocks[k]), k
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_truncated_blocks_bin(store_dir: Path) -> None:
    path = store_dir / "blocks.bin"
    size = path.stat().st_size
    os.truncate(path, size - 5000)
    with pytest.raises(DiskStoreError) as e:
        DiskStore.open(store_dir)
    assert str(path) in str(e.value) and str(size) in str(e.value) and "truncated" in str(e.value)
    assert not DiskStore.exists(store_dir)


def test_truncated_after_open(store_dir: Path) -> None:
    store = DiskStore.open(store_dir, direct=False)
    os.truncate(store_dir / "blocks.bin", 0)
    with pytest.raises(DiskStoreError, match="end of file"):
        store.read_into("e", torch.empty(100_000, dtype=torch.uint8))


@pytest.mark.parametrize(
    "text, match",
    [("{not json", "JSON"), ('{"version": 2, "blocks": {}}', "version"), ("[1, 2]", "version"),
     ('{"version": 1, "blocks": {"a": {"offset": 1}}, "file_size": 0}', "malformed")],
)
def test_bad_index(store_dir: Path, text: str, match: str) -> None:
    (store_dir / "index.json").write_text(text)
    with pytest.raises(DiskStoreError, match=match) as e:
        DiskStore.open(store_dir)
    assert "index.json" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_index(store_dir: Path) -> None:
    (store_dir / "index.json").unlink()
    with pytest.raises(DiskStoreError, match="index.json"):
        DiskStore.open(store_dir)
    with pytest.raises(DiskStoreError, match="index.json"):
        DiskStore.open(store_dir / "does-not-exist")
    assert not DiskStore.exists(store_dir)


def test_missing_blocks_bin(store_dir: Path) -> None:
    (store_dir / "blocks.bin").unlink()
    with pytest.raises(DiskStoreError, match="blocks.bin"):
        DiskStore.open(store_dir)


def test_verify_detects_flipped_byte(store_dir: Path) -> None:
    index = json.loads((store_dir / "index.json").read_text())
    off = index["blocks"]["e"]["offset"] + 12345
    with open(store_dir / "blocks.bin", "r+b") as f:
        f.seek(off)
        byte = f.read(1)[0]
        f.seek(off)
        f.write(bytes([byte ^ 0x01]))
    store = DiskStore.open(store_dir)
    store.verify("d")
    with pytest.raises(DiskStoreError, match="'e'") as e:
        store.verify("e")
    assert "blocks.bin" in str(e.value)


def test_writer_exception_leaves_nothing(tmp_path: Path) -> None:
    d = tmp_path / "store"
    with pytest.raises(RuntimeError, match="boom"):
        with DiskStoreWriter(d) as w:
            w.append("a", rand_bytes(5000, 1))
            raise RuntimeError("boom")
    assert not d.exists()
    d.mkdir()
    (d / "other.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="boom"):
        with DiskStoreWriter(d) as w:
            w.append("a", rand_bytes(5000, 1))
            raise RuntimeError("boom")
    assert os.listdir(d) == ["other.txt"]


def test_writer_bad_meta_and_no_finish(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        with DiskStoreWriter(tmp_path / "s1") as w:
            w.append("a", rand_bytes(10, 1))
            w.finish({"bad": object()})
    assert not (tmp_path / "s1").exists()
    with pytest.raises(RuntimeError, match="finish"):
        with DiskStoreWriter(tmp_path / "s2") as w:
            w.append("a", rand_bytes(10, 1))
    assert not (tmp_path / "s2").exists()


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with DiskStoreWriter(tmp_path / "s") as w:
        w.append("a", rand_bytes(10, 1))
        with pytest.raises(ValueError, match="duplicate"):
            w.append("a", rand_bytes(10, 1))
        with pytest.raises(ValueError, match="uint8"):
            w.append("b", torch.zeros(4, dtype=torch.float16))
        w.finish()
    with pytest.raises(RuntimeError):
        w.append("c", rand_bytes(10, 1))
    assert DiskStore.open(tmp_path / "s").keys() == ["a"]


def test_rewrite_replaces_old_store(store_dir: Path) -> None:
    with pytest.raises(RuntimeError):
        with DiskStoreWriter(store_dir) as w:
            w.append("new", rand_bytes(10, 1))
            raise RuntimeError("interrupted")
    assert "e" in DiskStore.open(store_dir)  # the old store survives an aborted rewrite
    with DiskStoreWriter(store_dir) as w:
        w.append("new", rand_bytes(10, 1))
        w.finish()
    assert DiskStore.open(store_dir).keys() == ["new"]
