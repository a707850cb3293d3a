"""Which shards were already checked against their sha256, so a reload need not hash them again.

Hashing is the slowest part of loading from a warm page cache: sha256 runs at ~0.7 GB/s per
core on the H100 host of benchmarks/load_probe.py, so 38 GB take 3.5 s on 16 cores while the
reads themselves take 1 s. A shard whose hash matched once is remembered by its identity on
disk: resolved path, size, modification time (ns), inode and device. A changed, replaced or
re-downloaded file no longer matches its entry and is hashed again; a file corrupted in place
without its mtime changing is not caught on later loads (``EXA_VERIFY=always`` hashes every
load; ``EXA_VERIFY=never`` never hashes).

The record is one JSON file in exa's cache directory, written atomically (tmp + rename), merged
with what is on disk at each save so concurrent processes lose nothing but their own race.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from runtime.hardware import cache_dir

FILE = "verified.json"
MAX_ENTRIES = 20000
POLICIES = ("once", "always", "never")


def policy() -> str:
    p = os.environ.get("EXA_VERIFY", "once").strip().lower() or "once"
    if p not in POLICIES:
        raise ValueError(f"EXA_VERIFY must be one of {', '.join(POLICIES)}, got {p!r}")
    return p


def identity(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"


class Verified:
    """The shards known to match their sha256 (see the module docstring)."""

    def __init__(self, root: Path | None = None, mode: str | None = None) -> None:
        self.mode = mode or policy()
        self.path = Path(root or cache_dir()) / FILE
        self._new: dict[str, str] = {}
        self._lock = threading.Lock()
        self._known = self._read() if self.mode == "once" else {}

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def needed(self, path: str | os.PathLike, sha256: str) -> bool:
        """Must ``path`` be hashed (against ``sha256``) on this load?"""
        if self.mode != "once":
            return self.mode == "always"
        try:
            return self._known.get(identity(path)) != sha256
        except OSError:
            return True

    def mark(self, path: str | os.PathLike, sha256: str) -> None:
        """``path`` was just hashed and matched ``sha256`` (thread-safe; kept until ``save``)."""
        if self.mode == "once":
            with self._lock:
                self._new[identity(path)] = sha256

    def save(self) -> None:
        """Merge the new entries into the record on disk (atomically); never raises."""
        with self._lock:
            new, self._new = self._new, {}
        if not new:
            return
        try:
            merged = {**self._read(), **new}
            if len(merged) > MAX_ENTRIES:                  # oldest first: dicts keep insertion order
                merged = dict(list(merged.items())[-MAX_ENTRIES:])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self.path)
            self._known.update(new)
        except OSError:                                    # a read-only cache dir: hash next time
            pass
