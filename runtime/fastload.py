"""Loading blocks in parallel: each block's bytes read once, straight into their home.

An exa checkpoint stores every block as one 4 KiB-aligned shard whose data IS the block buffer
(same layout). Such blocks are read with ``os.preadv`` directly into their destination (a
pinned host slice, or a reusable pinned staging buffer on their way to the GPU) by a pool of
reader threads, hashing each chunk as it arrives (both release the GIL), so loading runs at the
page cache's / disk's speed instead of one block at a time. Every other block (a Hugging Face
checkpoint, a quantize-at-load block, a layout that differs) goes through ``pack_block`` in the
calling thread, as before.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from runtime.checkpoint import CheckpointError
from runtime.loader import BlockDef, pack_block
from runtime.tiers import aligned_empty
from runtime.verified import Verified

CHUNK = 64 << 20
DEFAULT_READERS = max(2, min(16, os.cpu_count() or 1))      # reading and hashing scale with cores
SPLIT = 256 << 20        # unhashed blocks larger than this are read in pieces of this size ...
PIECE_THREADS = 4        # ... by this many threads
MAX_STAGING = 8          # staging buffers (blocks on their way to the GPU) read ahead at most


def direct_source(ckpt, block: BlockDef) -> tuple[Path, int, str] | None:
    """(shard, data offset, sha256) when the checkpoint stores ``block`` byte for byte, else None."""
    rows = getattr(ckpt, "rows", None)
    row = rows.get(block.name) if isinstance(rows, dict) else None
    if row is None or block.derived or row.get("layout") != block.layout.to_json():
        return None
    shard = Path(ckpt.root) / row["file"]
    with open(shard, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"shard {shard} is truncated (no safetensors header)")
    return shard, 8 + struct.unpack("<Q", head)[0], row["sha256"]


def read_into(shard: Path, offset: int, sha256: str, out: torch.Tensor,
              verified: Verified | None = None) -> None:
    """Read ``out.numel()`` bytes of ``shard`` at ``offset`` into ``out``; check their sha256
    unless ``verified`` knows the shard already matched it (then it is marked when it does).

    Hashing is sequential, so a hashed block is read by this thread alone; a block that needs no
    hashing and is larger than ``SPLIT`` is read in ``SPLIT`` pieces by ``PIECE_THREADS``
    threads (an embedding or head block of 2 GB would otherwise hold back the in-order loader).
    """
    mv = memoryview(out.numpy()).cast("B")
    check = verified is None or verified.needed(shard, sha256)
    h, n = (hashlib.sha256() if check else None), len(mv)
    fd = os.open(shard, os.O_RDONLY)
    try:
        if h is None and n > SPLIT:
            with ThreadPoolExecutor(PIECE_THREADS, thread_name_prefix="exa-piece") as ex:
                list(ex.map(lambda lo: _read_range(fd, shard, mv, offset, lo, min(n, lo + SPLIT)),
                            range(0, n, SPLIT)))
        else:
            _read_range(fd, shard, mv, offset, 0, n, h)
    finally:
        os.close(fd)
    if h is None:
        return
    if h.hexdigest() != sha256:
        raise CheckpointError(f"shard {shard} is corrupted: its sha256 does not match the manifest")
    if verified is not None:
        verified.mark(shard, sha256)


def _read_range(fd: int, shard: Path, mv: memoryview, offset: int, lo: int, hi: int, h=None) -> None:
    pos = lo
    while pos < hi:
        got = os.preadv(fd, [mv[pos:min(hi, pos + CHUNK)]], offset + pos)
        if got <= 0:
            raise CheckpointError(f"shard {shard} is truncated: {pos} of {len(mv)} bytes of its block")
        if h is not None:
            h.update(mv[pos:pos + got])
        pos += got


def load_blocks(ckpt, blocks: Iterable[BlockDef], dest: Callable[[BlockDef], torch.Tensor | None],
                readers: int = DEFAULT_READERS, pin_staging: bool = False,
                verified: Verified | None = None) -> Iterator[tuple[BlockDef, torch.Tensor]]:
    """Yield ``(block, buffer)`` in order, each buffer holding the block's packed bytes.

    ``dest(block)`` gives the block's final host buffer (e.g. a pinned-pool slice), or None: then
    the bytes land in a staging buffer that is valid only until the next item is requested
    (the caller copies it to the GPU), or, for blocks read by ``pack_block``, a fresh buffer.
    Up to ``readers`` blocks are read ahead, at most ``MAX_STAGING`` of them into staging
    buffers. ``verified``: shards already known to match their sha256 are not hashed again
    (``runtime.verified``); None hashes every shard.
    """
    blocks = list(blocks)
    direct = {b.name: direct_source(ckpt, b) for b in blocks}
    if not any(direct.values()):                     # nothing to read in parallel
        for b in blocks:
            out = dest(b)
            yield b, pack_block(ckpt, b, out=None if out is None else out[: b.nbytes])
        return
    free: deque[torch.Tensor] = deque()
    staging = max((b.nbytes for b in blocks if direct[b.name]), default=0)
    made = 0

    def stage() -> torch.Tensor | None:
        nonlocal made
        if free:
            return free.popleft()
        if made >= MAX_STAGING:
            return None
        made += 1
        return aligned_empty(staging, pin=pin_staging)

    pending: deque = deque()
    held: list = []                                  # the next block, waiting for a staging buffer
    it = iter(blocks)
    with ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="exa-load") as pool:
        def submit() -> bool:
            b = held.pop() if held else next(it, None)
            if b is None:
                return False
            src, out = direct[b.name], dest(b)
            if src is None:
                pending.append((b, None, out, None))
                return True
            full = stage() if out is None else None
            if out is None and full is None:
                held.append(b)
                return False
            buf = (out if full is None else full)[: b.nbytes]
            pending.append((b, pool.submit(read_into, *src, buf, verified), buf, full))
            return True

        for _ in range(max(1, readers)):
            if not submit():
                break
        while pending:
            b, fut, buf, full = pending.popleft()
            if fut is None:
                buf = pack_block(ckpt, b, out=None if buf is None else buf[: b.nbytes])
            else:
                fut.result()
            yield b, buf
            if full is not None:
                free.append(full)
            while len(pending) < max(1, readers) and submit():
                pass
    if verified is not None:
        verified.save()
