"""Host RAM for byte blocks: a few large (pinned) chunks, sub-allocated with 4 KiB alignment.

Pinning memory is slow (the kernel locks every page) and many small pinned allocations fragment
it, so :class:`PinnedPool` takes memory in large chunks and hands out aligned slices of them
with a bump allocator. Slices are never freed one by one; :meth:`PinnedPool.clear` drops all.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from . import ALIGN, _check_block, _check_out, _fmt_bytes, aligned_empty, round_up

MiB = 1 << 20
GiB = 1 << 30


class _Chunk:
    __slots__ = ("buf", "top")

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf  # 1-D uint8, ALIGN-aligned, length a multiple of ALIGN
        self.top = 0  # bump pointer: bytes handed out from the start

    @property
    def room(self) -> int:
        return self.buf.numel() - self.top


class PinnedPool:
    """Named byte blocks in (pinned) host RAM.

    Args:
        budget: most bytes of host memory the pool may take (chunks included, so this bounds
            what is actually allocated); ``None`` for no limit.
        chunk_bytes: size of the chunks memory is taken in. A block larger than this gets a
            chunk of its own. Rounded up to a multiple of 4096.
        pin: page-lock the chunks; ``None`` pins when CUDA is available. Without CUDA the
            memory is always plain (there is nothing to pin for).

    Every block starts at a 4096-aligned address, so a block can be the destination of an
    O_DIRECT disk read (allocate ``DiskStore.padded_nbytes(key)`` bytes for that).
    """

    name = "pinned"

    def __init__(
        self, budget: int | None = None, chunk_bytes: int = 512 * MiB, pin: bool | None = None
    ) -> None:
        if budget is not None and budget < 0:
            raise ValueError(f"PinnedPool: budget must be >= 0 or None, got {budget}")
        if chunk_bytes <= 0:
            raise ValueError(f"PinnedPool: chunk_bytes must be > 0, got {chunk_bytes}")
        self.budget = budget
        self.chunk_bytes = round_up(chunk_bytes)
        want_pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.pinned = want_pin and torch.cuda.is_available()
        self._chunks: list[_Chunk] = []
        self._blocks: dict[str, torch.Tensor] = {}
        self._reserved = 0
        self._used = 0
        self._lock = threading.Lock()

    # -- allocation -------------------------------------------------------------------------

    def alloc(self, nbytes: int, what: str = "") -> torch.Tensor:
        """Hand out an uninitialised, 4096-aligned 1-D uint8 view of ``nbytes`` bytes.

        Args:
            nbytes: size wanted; ``round_up(nbytes, 4096)`` bytes of the pool are used.
            what: a description for the error message (e.g. the block name).

        Raises:
            MemoryError: the pool would exceed its budget.
        """
        if nbytes < 0:
            raise ValueError(f"PinnedPool.alloc: nbytes must be >= 0, got {nbytes}")
        need = round_up(nbytes)
        if need == 0:
            return torch.empty(0, dtype=torch.uint8)
        with self._lock:
            chunk = next((c for c in self._chunks if c.room >= need), None)
            if chunk is None:
                size = need if need > self.chunk_bytes else self.chunk_bytes
                if self.budget is not None:
                    left = (self.budget - self._reserved) // ALIGN * ALIGN
                    if need > left:
                        raise self._over_budget(nbytes, what)
                    size = min(size, left)
                chunk = self._new_chunk(size)
            view = chunk.buf[chunk.top : chunk.top + nbytes]
            chunk.top += need
            self._used += need
            return view

    def reserve(
        self,
        total_bytes: int | Sequence[int],
        desc: str = "pinning host memory",
        progress: bool | None = None,
    ) -> None:
        """Allocate chunks up front, so that the later ``put``/``alloc`` calls don't.

        Args:
            total_bytes: either a byte total (split into ``chunk_bytes`` chunks; blocks that do
                not fit a chunk's tail spill into new chunks later), or the sizes of the blocks
                to come, in the order they will be put: they are packed into chunks exactly,
                so putting them in that order takes no further memory.
            desc: progress bar label.
            progress: show a progress bar; ``None`` shows it only for 1 GiB or more.

        Raises:
            MemoryError: the total does not fit in the budget (nothing is allocated then).
        """
        if isinstance(total_bytes, Sequence):
            sizes = self._pack(total_bytes)
        else:
            whole = round_up(int(total_bytes))
            sizes = [self.chunk_bytes] * (whole // self.chunk_bytes)
            sizes += [whole % self.chunk_bytes] if whole % self.chunk_bytes else []
        total = sum(sizes)
        with self._lock:
            if self.budget is not None and self._reserved + total > self.budget:
                raise self._over_budget(total, f"reserve({desc!r})")
            show = progress if progress is not None else total >= GiB
            bar = tqdm(
                total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not show, leave=False,
            )
            with bar:           # one region, carved into the chunks: pinned at once (faster)
                region = aligned_empty(total, ALIGN, pin=self.pinned)
                at = 0
                for size in sizes:
                    self._chunks.append(_Chunk(region[at : at + size]))
                    self._reserved += size
                    at += size
                bar.update(total)

    def _pack(self, block_sizes: Sequence[int]) -> list[int]:
        """Group block sizes (in order) into chunk sizes of at most ``chunk_bytes``."""
        sizes: list[int] = []
        current = 0
        for n in block_sizes:
            need = round_up(int(n))
            if current and current + need > self.chunk_bytes:
                sizes.append(current)
                current = 0
            current += need
        return sizes + ([current] if current else [])

    def _new_chunk(self, size: int) -> _Chunk:
        chunk = _Chunk(aligned_empty(size, ALIGN, pin=self.pinned))
        self._chunks.append(chunk)
        self._reserved += chunk.buf.numel()
        return chunk

    def _over_budget(self, nbytes: int, what: str) -> MemoryError:
        assert self.budget is not None
        label = f" for {what}" if what else ""
        kind = "pinned host memory" if self.pinned else "host memory"
        return MemoryError(
            f"PinnedPool budget of {_fmt_bytes(self.budget)} ({kind}) exceeded: asked for "
            f"{_fmt_bytes(nbytes)}{label} with {_fmt_bytes(self._reserved)} already reserved "
            f"({_fmt_bytes(self._used)} in use). Raise the pinned-RAM budget or keep fewer "
            f"blocks in host RAM."
        )

    def clear(self) -> None:
        """Forget every block and release the chunks (views handed out keep their memory)."""
        with self._lock:
            self._blocks.clear()
            self._chunks.clear()
            self._reserved = 0
            self._used = 0

    # -- the Tier protocol ------------------------------------------------------------------

    def put(self, key: str, data: torch.Tensor) -> None:
        """Copy ``data`` (1-D uint8) into the pool under ``key``.

        Putting an existing key again overwrites it in place when the size matches.

        Raises:
            MemoryError: the pool would exceed its budget.
            ValueError: ``key`` exists with a different size.
        """
        data = _check_block(data, f"PinnedPool.put({key!r})")
        old = self._blocks.get(key)
        if old is not None and old.numel() != data.numel():
            raise ValueError(
                f"PinnedPool.put: block {key!r} already holds {old.numel()} bytes, "
                f"cannot replace it with {data.numel()} bytes"
            )
        dst = old if old is not None else self.alloc(data.numel(), f"block {key!r}")
        dst.copy_(data)
        self._blocks[key] = dst

    def get(self, key: str) -> torch.Tensor:
        """The stored 1-D uint8 view (4096-aligned, exactly ``nbytes(key)`` long)."""
        try:
            return self._blocks[key]
        except KeyError:
            raise KeyError(f"block {key!r} is not in the pinned pool") from None

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy the block into ``out[:nbytes]`` (``out`` on any device)."""
        block = self.get(key)
        out = _check_out(out, block.numel(), f"PinnedPool.read_into({key!r})")
        out[: block.numel()].copy_(block)

    def nbytes(self, key: str) -> int:
        """Size of the block in bytes."""
        return self.get(key).numel()

    @property
    def used(self) -> int:
        """Bytes handed out (each allocation counted rounded up to 4096)."""
        return self._used

    @property
    def reserved(self) -> int:
        """Bytes of host memory the pool's chunks hold."""
        return self._reserved

    def keys(self) -> list[str]:
        """Names of the blocks held, in insertion order."""
        return list(self._blocks)

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._blocks))

    def __repr__(self) -> str:
        budget = "none" if self.budget is None else _fmt_bytes(self.budget)
        return (
            f"PinnedPool(pinned={self.pinned}, blocks={len(self)}, used={_fmt_bytes(self._used)}, "
            f"reserved={_fmt_bytes(self._reserved)}, budget={budget})"
        )
