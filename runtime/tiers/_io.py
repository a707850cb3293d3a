"""Positional reads of blocks from files: O_DIRECT while aligned, then plain reads.

Shared by the block store (``disk.DiskStore``) and blocks read in place (``files.FileBlocks``).
"""
from __future__ import annotations

import os
from pathlib import Path

from . import ALIGN

_MAX_IO = 1 << 30  # bytes per read call (Linux caps one read at ~2 GiB anyway)


class DiskStoreError(ValueError):
    """A block store is missing, incomplete, malformed or corrupted."""


def _pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """One positional read into ``buf`` (no shared file offset, so thread-safe)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buf], offset)
    data = os.pread(fd, len(buf), offset)
    buf[: len(data)] = data
    return len(data)


def read_direct(fd: int, buf: memoryview, offset: int, n: int) -> int:
    """O_DIRECT reads into ``buf`` (padded length) while transfers stay aligned; returns the
    bytes read (>= n when done, fewer after an odd short read: finish with ``read_plain``)."""
    done = 0
    while done < n:
        got = _pread_into(fd, buf[done : done + min(len(buf) - done, _MAX_IO)], offset + done)
        done += got
        if got == 0 or got % ALIGN:
            break
    return done


def read_plain(fd: int, buf: memoryview, offset: int, path: Path, key: str) -> None:
    """Fill ``buf`` with plain positional reads from ``offset``; a short file is a DiskStoreError."""
    done = 0
    while done < len(buf):
        got = _pread_into(fd, buf[done : done + min(len(buf) - done, _MAX_IO)], offset + done)
        if got == 0:
            raise DiskStoreError(f"{path}: unexpected end of file at byte {offset + done} while reading "
                                 f"block {key!r} (the file was truncated after it was opened)")
        done += got
