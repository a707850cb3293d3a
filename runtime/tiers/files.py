"""Blocks that already sit in files on disk, read in place (no copy into a block store).

Each key names (file, byte offset, nbytes). When every offset is 4096-aligned the reads use
O_DIRECT (bypassing the page cache, like :class:`~runtime.tiers.disk.DiskStore`), provided the
destination is aligned and long enough for the padded length; otherwise plain positional reads.
The same ``read_into(key, out)`` interface as DiskStore, so the prefetcher's reader threads use
either. Knows nothing of what the bytes mean.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import ALIGN, _check_out, _cpu_buffer, round_up
from ._io import DiskStoreError, read_direct, read_plain


class FileBlocks:
    """Read-only named blocks inside existing files: ``{key: (path, offset, nbytes)}``."""

    name = "disk"

    def __init__(self, entries: dict[str, tuple[str | os.PathLike, int, int]], direct: bool | None = None):
        self._entries = {k: (Path(p), int(o), int(n)) for k, (p, o, n) in entries.items()}
        self._fds: dict[Path, int] = {}
        self._dfds: dict[Path, int | None] = {}
        flag = getattr(os, "O_DIRECT", 0)
        aligned = all(o % ALIGN == 0 for _, o, _ in self._entries.values())
        self.direct = bool(flag) and aligned and direct is not False
        for path, offset, n in self._entries.values():
            if path in self._fds:
                continue
            if path.stat().st_size < offset + n:
                raise DiskStoreError(f"{path} is shorter than the block it should hold ({offset + n} bytes)")
            self._fds[path] = os.open(path, os.O_RDONLY)
            self._dfds[path] = self._open_direct(path, flag) if self.direct else None

    @staticmethod
    def _open_direct(path: Path, flag: int) -> int | None:
        try:
            return os.open(path, os.O_RDONLY | flag)
        except OSError:                     # tmpfs, some overlay filesystems
            return None

    def keys(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, key: str) -> int:
        return self._entry(key)[2]

    def _entry(self, key: str) -> tuple[Path, int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"block {key!r} is not among the file blocks") from None

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Block ``key`` into ``out`` (1-D uint8 CPU tensor). Thread-safe (positional reads)."""
        path, offset, n = self._entry(key)
        out = _check_out(out, n, f"FileBlocks.read_into({key!r})")
        buf, done = _cpu_buffer(out), 0
        dfd = self._dfds.get(path)
        if dfd is not None and out.numel() >= round_up(n) and out.data_ptr() % ALIGN == 0:
            try:
                done = min(n, read_direct(dfd, buf[:round_up(n)], offset, n))
            except OSError:                 # e.g. EINVAL at a short tail: plain reads instead
                done = 0
        fd = self._fds.get(path)
        if fd is None:
            raise ValueError("FileBlocks is closed")
        if done < n:
            read_plain(fd, buf[done:n], offset + done, path, key)

    def close(self) -> None:
        for fd in list(self._fds.values()) + [d for d in self._dfds.values() if d is not None]:
            os.close(fd)
        self._fds, self._dfds = {}, {}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
