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

CHUNK = 64 << 20
DEFAULT_READERS = max(2, min(16, os.cpu_count() or 1))      # reading and hashing scale with cores


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


def read_into(shard: Path, offset: int, sha256: str, out: torch.Tensor) -> None:
    """Read ``out.numel()`` bytes of ``shard`` at ``offset`` into ``out``; check their sha256."""
    mv = memoryview(out.numpy()).cast("B")
    h, pos, n = hashlib.sha256(), 0, len(mv)
    fd = os.open(shard, os.O_RDONLY)
    try:
        while pos < n:
            got = os.preadv(fd, [mv[pos:min(n, pos + CHUNK)]], offset + pos)
            if got <= 0:
                raise CheckpointError(f"shard {shard} is truncated: {pos} of {n} bytes of its block")
            h.update(mv[pos:pos + got])
            pos += got
    finally:
        os.close(fd)
    if h.hexdigest() != sha256:
        raise CheckpointError(f"shard {shard} is corrupted: its sha256 does not match the manifest")


def load_blocks(ckpt, blocks: Iterable[BlockDef], dest: Callable[[BlockDef], torch.Tensor | None],
                readers: int = DEFAULT_READERS, pin_staging: bool = False) -> Iterator[tuple[BlockDef, torch.Tensor]]:
    """Yield ``(block, buffer)`` in order, each buffer holding the block's packed bytes.

    ``dest(block)`` gives the block's final host buffer (e.g. a pinned-pool slice), or None: then
    the bytes land in a staging buffer that is valid only until the next item is requested
    (the caller copies it to the GPU), or, for blocks read by ``pack_block``, a fresh buffer.
    Up to ``readers`` blocks are read ahead.
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

    def stage() -> torch.Tensor:
        return free.popleft() if free else torch.empty(staging, dtype=torch.uint8, pin_memory=pin_staging)

    pending: deque = deque()
    it = iter(blocks)
    with ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="exa-load") as pool:
        def submit() -> bool:
            b = next(it, None)
            if b is None:
                return False
            src, out = direct[b.name], dest(b)
            if src is None:
                pending.append((b, None, out, None))
                return True
            full = stage() if out is None else None
            buf = (out if full is None else full)[: b.nbytes]
            pending.append((b, pool.submit(read_into, *src, buf), buf, full))
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
            submit()
