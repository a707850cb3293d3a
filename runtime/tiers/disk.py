"""An on-disk block store: written once, read many times, with aligned (O_DIRECT) reads.

Layout of a store directory::

    blocks.bin   every block at a 4096-aligned offset, zero-padded to a multiple of 4096
    index.json   {"version": 1, "blocks": {key: {"offset", "nbytes", "crc32"}},
                  "meta": {...}, "file_size": ...}

``index.json`` is written last (temp file, fsync, rename), so its presence marks a complete
store; an interrupted write leaves none of the files behind.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from . import (
    ALIGN,
    _check_block,
    _check_out,
    _cpu_buffer,
    _fmt_bytes,
    aligned_empty,
    round_up,
)
from ._io import DiskStoreError, _pread_into, read_direct, read_plain

BLOCKS = "blocks.bin"
INDEX = "index.json"
VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskStoreWriter:
    """Writes a block store into ``dir``; use as a context manager.

    Example::

        with DiskStoreWriter(path) as w:
            for key, block in blocks:
                w.append(key, block)
            w.finish({"model": "llama"})

    An exception inside the ``with`` block (or leaving it without :meth:`finish`) calls
    :meth:`abort`: the temporary files are removed and a previous complete store in ``dir``,
    if any, is left untouched.
    """

    def __init__(self, dir: str | os.PathLike[str]) -> None:
        self.dir = Path(dir)
        self._made_dir = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._tmp = self.dir / (BLOCKS + ".tmp")
        self._index_tmp = self.dir / (INDEX + ".tmp")
        self._f = open(self._tmp, "wb")
        self._blocks: dict[str, dict[str, int]] = {}
        self._size = 0
        self._state = "open"
        self._renamed = False  # blocks.bin is in place but index.json not yet

    def append(self, key: str, data: torch.Tensor) -> int:
        """Write ``data`` (1-D uint8 tensor) as block ``key``; returns its file offset."""
        if self._state != "open":
            raise RuntimeError(f"DiskStoreWriter({self.dir}): cannot append after {self._state}")
        if not isinstance(key, str):
            raise TypeError(f"DiskStoreWriter.append: key must be a str, got {type(key).__name__}")
        if key in self._blocks:
            raise ValueError(f"DiskStoreWriter.append: duplicate block key {key!r}")
        data = _check_block(data, f"DiskStoreWriter.append({key!r})").cpu()
        buf = _cpu_buffer(data)
        offset = self._size
        self._f.write(buf)
        pad = round_up(len(buf)) - len(buf)
        if pad:
            self._f.write(bytes(pad))
        self._blocks[key] = {"offset": offset, "nbytes": len(buf), "crc32": zlib.crc32(buf)}
        self._size += len(buf) + pad
        return offset

    def finish(self, meta: dict[str, Any] | None = None) -> Path:
        """Make the store complete and durable; returns ``dir``.

        Args:
            meta: JSON-serialisable metadata stored in the index (``DiskStore.meta``).
        """
        if self._state != "open":
            raise RuntimeError(f"DiskStoreWriter({self.dir}): cannot finish after {self._state}")
        index = {
            "version": VERSION,
            "blocks": self._blocks,
            "meta": {} if meta is None else meta,
            "file_size": self._size,
        }
        text = json.dumps(index, indent=1)  # fail on bad meta before touching anything
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        # Drop an older store's index first: between the two renames the store is incomplete.
        (self.dir / INDEX).unlink(missing_ok=True)
        os.replace(self._tmp, self.dir / BLOCKS)
        self._renamed = True
        with open(self._index_tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._index_tmp, self.dir / INDEX)
        _fsync_dir(self.dir)
        self._state = "finished"
        return self.dir

    def abort(self) -> None:
        """Discard everything written; removes the temp files (and ``dir`` if it made it)."""
        if self._state == "finished":
            return
        self._state = "aborted"
        self._f.close()
        self._tmp.unlink(missing_ok=True)
        self._index_tmp.unlink(missing_ok=True)
        if self._renamed:  # finish() failed half-way: blocks.bin without an index is garbage
            (self.dir / BLOCKS).unlink(missing_ok=True)
        if self._made_dir:
            try:
                self.dir.rmdir()
            except OSError:  # not empty: someone else put files there
                pass

    def __enter__(self) -> DiskStoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "open":
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError(
                f"DiskStoreWriter({self.dir}): left the with-block without finish(); "
                "nothing was kept"
            )


class DiskStore:
    """A complete block store opened for reading. Create with :meth:`DiskStore.open`.

    Attributes:
        direct: whether reads use O_DIRECT (bypassing the page cache) when the destination is
            4096-aligned and long enough. Detected at open; set it to False to force plain reads.
    """

    name = "disk"

    def __init__(self, dir: Path, index: dict[str, Any], direct: bool | None = None) -> None:
        self.dir = dir
        self.path = dir / BLOCKS
        self._blocks: dict[str, dict[str, int]] = index["blocks"]
        self._meta: dict[str, Any] = index["meta"]
        self.file_size: int = index["file_size"]
        self._fd: int | None = os.open(self.path, os.O_RDONLY)
        self._dfd: int | None = None if direct is False else self._open_direct()
        self.direct = self._dfd is not None

    @classmethod
    def open(cls, dir: str | os.PathLike[str], direct: bool | None = None) -> DiskStore:
        """Open and validate the store in ``dir``.

        Args:
            dir: the store directory.
            direct: ``None`` detects O_DIRECT support, ``False`` never uses it.

        Raises:
            DiskStoreError: index missing, not JSON, wrong version or malformed, or
                ``blocks.bin`` missing or not the size the index records.
        """
        d = Path(dir)
        return cls(d, _load_index(d), direct)

    @staticmethod
    def exists(dir: str | os.PathLike[str]) -> bool:
        """Whether ``dir`` holds a complete, consistent store (index valid, sizes match)."""
        try:
            _load_index(Path(dir))
        except DiskStoreError:
            return False
        return True

    def _open_direct(self) -> int | None:
        """An O_DIRECT fd if the filesystem accepts O_DIRECT and an aligned read works."""
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or self.file_size < ALIGN:
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | flag)
        except OSError:  # EINVAL on tmpfs and some overlay filesystems
            return None
        try:
            probe = aligned_empty(ALIGN)
            if _pread_into(fd, _cpu_buffer(probe), 0) != ALIGN:
                raise OSError("short O_DIRECT probe read")
        except OSError:
            os.close(fd)
            return None
        return fd

    # -- metadata ---------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` dict given to :meth:`DiskStoreWriter.finish`."""
        return self._meta

    def keys(self) -> list[str]:
        """Block names in file order."""
        return list(self._blocks)

    def _entry(self, key: str) -> dict[str, int]:
        try:
            return self._blocks[key]
        except KeyError:
            raise KeyError(f"block {key!r} is not in the store {self.dir}") from None

    def nbytes(self, key: str) -> int:
        """Size of the block in bytes."""
        return self._entry(key)["nbytes"]

    def padded_nbytes(self, key: str) -> int:
        """Size rounded up to 4096: what an O_DIRECT read of the block writes into ``out``."""
        return round_up(self.nbytes(key))

    def __contains__(self, key: object) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    # -- reading ----------------------------------------------------------------------------

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Read block ``key`` into ``out`` (1-D uint8 CPU tensor, pinned or not). Thread-safe.

        O_DIRECT is used when available, ``out.data_ptr()`` is 4096-aligned and
        ``len(out) >= padded_nbytes(key)``; it then also writes the zero padding up to
        ``padded_nbytes(key)``. Otherwise a plain positional read fills ``out[:nbytes]``.

        Raises:
            DiskStoreError: the file ends before the block does.
        """
        entry = self._entry(key)
        offset, n = entry["offset"], entry["nbytes"]
        out = _check_out(out, n, f"DiskStore.read_into({key!r})")
        if n == 0:
            return
        buf = _cpu_buffer(out)
        padded = round_up(n)
        use_direct = (
            self.direct
            and self._dfd is not None
            and out.numel() >= padded
            and out.data_ptr() % ALIGN == 0
        )
        done = read_direct(self._dfd, buf[:padded], offset, n) if use_direct else 0
        if done < n:
            if self._fd is None:
                raise ValueError(f"DiskStore {self.dir} is closed")
            read_plain(self._fd, buf[done:n], offset + done, self.path, key)

    def verify(self, key: str) -> None:
        """Read block ``key`` and check its crc32.

        Raises:
            DiskStoreError: the checksum does not match (names the block and the file).
        """
        entry = self._entry(key)
        tmp = aligned_empty(entry["nbytes"])
        self.read_into(key, tmp)
        got = zlib.crc32(_cpu_buffer(tmp)[: entry["nbytes"]])
        if got != entry["crc32"]:
            raise DiskStoreError(
                f"block {key!r} in {self.path} is corrupted: crc32 {got:#010x}, "
                f"expected {entry['crc32']:#010x}"
            )

    def put(self, key: str, data: torch.Tensor) -> None:
        """Not supported: a store is read-only; write one with :class:`DiskStoreWriter`."""
        raise NotImplementedError("DiskStore is read-only; write stores with DiskStoreWriter")

    def get(self, key: str) -> torch.Tensor:
        """Not supported: disk blocks have no in-memory view; use :meth:`read_into`."""
        raise NotImplementedError("DiskStore has no in-memory blocks; use read_into()")

    def close(self) -> None:
        """Close the file descriptors (idempotent)."""
        for attr in ("_fd", "_dfd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)
        self.direct = False

    def __enter__(self) -> DiskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"DiskStore({str(self.dir)!r}, blocks={len(self)}, size={_fmt_bytes(self.file_size)}, "
            f"direct={self.direct})"
        )


def _load_index(d: Path) -> dict[str, Any]:
    """Parse and validate ``d/index.json`` against ``d/blocks.bin``."""
    index_path, blocks_path = d / INDEX, d / BLOCKS
    if not index_path.is_file():
        raise DiskStoreError(
            f"no complete block store in {d}: {index_path} is missing "
            "(it is written last, so the store was never finished)"
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiskStoreError(f"{index_path} is not a readable JSON file: {e}") from e
    if not isinstance(index, dict) or index.get("version") != VERSION:
        found = index.get("version") if isinstance(index, dict) else type(index).__name__
        raise DiskStoreError(f"{index_path}: unsupported version {found!r} (expected {VERSION})")
    blocks, size = index.get("blocks"), index.get("file_size")
    if not isinstance(blocks, dict) or not isinstance(size, int) or size < 0:
        raise DiskStoreError(f"{index_path}: malformed index (bad 'blocks' or 'file_size')")
    index.setdefault("meta", {})
    for key, e in blocks.items():
        ok = isinstance(e, dict) and all(isinstance(e.get(f), int) for f in ("offset", "nbytes"))
        ok = ok and isinstance(e.get("crc32"), int)
        if not ok or e["offset"] % ALIGN or e["offset"] < 0 or e["nbytes"] < 0:
            raise DiskStoreError(f"{index_path}: malformed entry for block {key!r}: {e!r}")
        if e["offset"] + e["nbytes"] > size:
            raise DiskStoreError(
                f"{index_path}: block {key!r} ends at byte {e['offset'] + e['nbytes']}, "
                f"past the recorded file size {size}"
            )
    try:
        actual = blocks_path.stat().st_size
    except OSError as e:
        raise DiskStoreError(f"{blocks_path} is missing or unreadable ({e}); {index_path} "
                             "refers to it") from e
    if actual != size:
        what = "truncated" if actual < size else "longer than recorded"
        raise DiskStoreError(
            f"{blocks_path} is {what}: {actual} bytes on disk, {size} bytes expected "
            f"by {index_path}"
        )
    return index
