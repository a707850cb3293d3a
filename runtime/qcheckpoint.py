"""The exa checkpoint: a (quantized) model stored block by block, ready to stream.

Layout of a checkpoint directory::

    exa.json                         manifest: format version, quantization spec, compute dtype,
                                     blocks (file, sha256, bytes, tensor layout), user metadata
    config.json, tokenizer files     the source model's own
    blocks/00003-layers.2.safetensors   one shard per block: ONE uint8 tensor "block" holding the
                                     block's packed buffer; the header is padded so the data
                                     starts on a 4 KiB boundary (one aligned read per block)

Every shard is a valid safetensors file. Writing goes to a temporary directory that is renamed
into place at the end (fsync'd), so a crash never leaves a half-written checkpoint. Reading
checks each shard's size up front and its sha256 when the block is first read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import torch

from runtime.blocks import Layout, views
from runtime.checkpoint import Checkpoint, CheckpointError

MANIFEST = "exa.json"
FORMAT_VERSION = 1
_ALIGN = 4096


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, buf: torch.Tensor, layout: Layout, durable: bool = True) -> str:
    """One block as a safetensors file with 4 KiB-aligned data; returns the data's sha256.

    ``durable=False`` skips the fsync (scratch data such as benchmark models)."""
    data = memoryview(buf.detach().cpu().contiguous().numpy())
    header = {"block": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]},
              "__metadata__": {"exa_layout": json.dumps(layout.to_json())}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    pad = (-(8 + len(raw))) % _ALIGN
    raw += b" " * pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.write(data)
        f.flush()
        if durable:
            os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(out_dir: str | Path, blocks: Iterable, pack: Callable, *, config, tokenizer_dir: Callable | None,
                     quant: dict | None, skip_modules: list[str], dtype: torch.dtype, metadata: dict,
                     overwrite: bool = False, writers: int = 4, durable: bool = True) -> Path:
    """Write an exa checkpoint; ``pack(block) -> uint8 buffer`` is called once per block, in order.

    Shards are hashed and written by ``writers`` threads while the next blocks are packed (at
    most ``2 * writers`` packed blocks wait in memory). ``durable=False`` skips the fsyncs
    (scratch data); the checkpoint still appears atomically, by one rename, when complete.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blocks").mkdir(parents=True)
    try:
        rows, pending = [], deque()

        def finish_one() -> None:
            b, fname, fut = pending.popleft()
            rows.append({"name": b.name, "kind": b.kind, "file": fname, "sha256": fut.result(),
                         "nbytes": b.layout.nbytes, "layout": b.layout.to_json()})

        with ThreadPoolExecutor(max(1, writers), thread_name_prefix="exa-write") as pool:
            for i, b in enumerate(blocks):
                buf = pack(b)
                fname = f"blocks/{i:05d}-{b.name}.safetensors"
                pending.append((b, fname, pool.submit(write_shard, tmp / fname, buf[: b.layout.nbytes],
                                                      b.layout, durable)))
                while len(pending) >= 2 * max(1, writers) or (pending and pending[0][2].done()):
                    finish_one()
            while pending:
                finish_one()
        config.save_pretrained(tmp)
        if tokenizer_dir is not None:
            tokenizer_dir(tmp)
        _write_json(tmp / MANIFEST, _manifest(rows, quant, skip_modules, dtype, metadata))
        _fsync_dir(tmp / "blocks")
        _fsync_dir(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _manifest(rows: list, quant: dict | None, skip_modules, dtype: torch.dtype, metadata: dict) -> dict:
    return {"format": "exa", "version": FORMAT_VERSION, "quantization": quant,
            "skip_modules": list(skip_modules), "dtype": str(dtype).removeprefix("torch."),
            "blocks": rows, "metadata": metadata}


def _write_json(path: Path, obj, atomic: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp") if atomic else path
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    if atomic:
        os.replace(tmp, path)


def read_shard(path: Path) -> torch.Tensor:
    """The block buffer (uint8) of a shard written by ``write_shard``."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("block")


class ResumableWriter:
    """Writes an exa checkpoint block by block straight into ``out_dir``, resumable after a crash.

    Each shard is written to a temporary file and renamed into ``out_dir/blocks``; a progress
    file (``.exa-progress.json``, replaced atomically after every block) records the finished
    blocks (file, sha256, layout) and the run's ``settings``. A rerun with the same settings
    skips every block whose shard still matches its sha256 (``done`` returns its buffer); with
    other settings it refuses unless ``overwrite``. ``finish`` writes config, tokenizer and,
    last, ``exa.json``: until then the directory is not a loadable checkpoint.
    """

    PROGRESS = ".exa-progress.json"

    def __init__(self, out_dir: str | Path, settings: dict, overwrite: bool = False):
        self.out = Path(out_dir)
        self.settings = json.loads(json.dumps(settings))          # normalised (tuples -> lists)
        prog = self.out / self.PROGRESS
        state = json.loads(prog.read_text()) if prog.is_file() else None
        busy = self.out.exists() and any(self.out.iterdir())
        if busy and (state is None or state.get("settings") != self.settings):
            if not overwrite:
                why = ("holds a run with other settings" if state is not None
                       else "exists and is not empty")
                raise FileExistsError(f"{self.out} {why} (pass overwrite=True to replace it)")
            shutil.rmtree(self.out)
            state = None
        (self.out / "blocks").mkdir(parents=True, exist_ok=True)
        self.rows: dict[str, dict] = {r["name"]: r for r in (state or {}).get("rows", [])}
        if state is None:                  # claimed at once: a run stopped before its first block resumes
            _write_json(self.out / self.PROGRESS, {"settings": self.settings, "rows": []}, atomic=True)

    def done(self, index: int, block) -> torch.Tensor | None:
        """The finished buffer of ``block`` if a previous run wrote it intact, else None."""
        row = self.rows.get(block.name)
        if row is None or row["file"] != self._fname(index, block) or row["layout"] != block.layout.to_json():
            return None
        try:
            buf = read_shard(self.out / row["file"])
        except Exception:
            buf = None
        if buf is None or hashlib.sha256(memoryview(buf.numpy())).hexdigest() != row["sha256"]:
            del self.rows[block.name]
            return None
        return buf

    def write(self, index: int, block, buf: torch.Tensor) -> None:
        fname = self._fname(index, block)
        tmp = self.out / (fname + ".tmp")
        sha = write_shard(tmp, buf[: block.layout.nbytes], block.layout)
        os.replace(tmp, self.out / fname)
        _fsync_dir(self.out / "blocks")
        self.rows[block.name] = {"name": block.name, "kind": block.kind, "file": fname, "sha256": sha,
                                 "nbytes": block.layout.nbytes, "layout": block.layout.to_json()}
        _write_json(self.out / self.PROGRESS, {"settings": self.settings, "rows": list(self.rows.values())},
                    atomic=True)

    def finish(self, order: list[str], *, config, tokenizer_dir: Callable | None, quant: dict | None,
               skip_modules, dtype: torch.dtype, metadata: dict) -> Path:
        """Write config, tokenizer and the manifest (blocks in ``order``); drop the progress file."""
        missing = [n for n in order if n not in self.rows]
        if missing:
            raise RuntimeError(f"cannot finish {self.out}: blocks {missing} were not written")
        config.save_pretrained(self.out)
        if tokenizer_dir is not None:
            tokenizer_dir(self.out)
        rows = [self.rows[n] for n in order]
        _write_json(self.out / MANIFEST, _manifest(rows, quant, skip_modules, dtype, metadata), atomic=True)
        (self.out / self.PROGRESS).unlink(missing_ok=True)
        _fsync_dir(self.out)
        return self.out

    @staticmethod
    def _fname(index: int, block) -> str:
        return f"blocks/{index:05d}-{block.name}.safetensors"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:                                  # a filesystem without hard links
        shutil.copy2(src, dst)


def rewrite_tensors(ckpt_dir: str | Path, updates: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Replace some tensors of an exa checkpoint (same shapes and dtypes) and merge ``metadata``
    into its manifest. Only the shards holding a replaced tensor are rewritten (sha256
    recomputed; the others are hard-linked, not copied); the new checkpoint is built beside the old one and swapped in by renames, so
    an interruption leaves either the old or the new checkpoint, never a mix."""
    src = Path(ckpt_dir)
    m = json.loads((src / MANIFEST).read_text())
    tmp = src.parent / f".{src.name}.rewrite-{os.getpid()}"
    old = src.parent / f".{src.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=_link_or_copy)      # unchanged shards: hard links
    try:
        todo = dict(updates)
        for row in m["blocks"]:
            layout = Layout.from_json(row["layout"])
            hit = [e for e in layout.entries if e.name in todo]
            if not hit:
                continue
            buf = read_shard(src / row["file"]).clone()
            got = dict(zip((e.name for e in layout.entries), views(buf, layout)))
            for e in hit:
                new = todo.pop(e.name)
                if tuple(new.shape) != tuple(got[e.name].shape):
                    raise ValueError(f"{e.name}: shape {tuple(new.shape)} != stored {tuple(got[e.name].shape)}")
                got[e.name].copy_(new.to(got[e.name].dtype))
            (tmp / row["file"]).unlink()             # a hard link to the old shard: never write through it
            row["sha256"] = write_shard(tmp / row["file"], buf[: row["nbytes"]], layout)
        if todo:
            raise KeyError(f"not in {src}: {sorted(todo)[:5]}")
        m["metadata"] = {**m.get("metadata", {}), **metadata}
        _write_json(tmp / MANIFEST, m, atomic=True)
        _fsync_dir(tmp / "blocks")
        _fsync_dir(tmp)
        os.replace(src, old)
        os.replace(tmp, src)
        _fsync_dir(src.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return src


def is_exa_checkpoint(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class ExaCheckpoint(Checkpoint):
    """Reads an exa checkpoint: tensors are views into each block's (verified) buffer."""

    def __init__(self, path: Path, config, trust_remote_code: bool = False):
        path = Path(path)
        try:
            m = json.loads((path / MANIFEST).read_text())
            if m.get("format") != "exa" or int(m.get("version", 0)) > FORMAT_VERSION:
                raise ValueError(f"format {m.get('format')!r} version {m.get('version')!r} is not supported")
            rows = m["blocks"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"bad exa manifest {path / MANIFEST}: {e}") from e
        self.manifest = m
        self.rows = {r["name"]: r for r in rows}
        files = {}
        for r in rows:
            shard = path / r["file"]
            if not shard.is_file():
                raise CheckpointError(f"shard {shard} named in {path / MANIFEST} is missing")
            layout = Layout.from_json(r["layout"])
            size = shard.stat().st_size
            if size < r["nbytes"]:
                raise CheckpointError(f"shard {shard} is truncated: {size} bytes, the block alone is {r['nbytes']}")
            for e in layout.entries:
                files[e.name] = r["name"]
        super().__init__(config, {}, path, {"pretrained_model_name_or_path": str(path)})
        self._block_of = files
        self._buffers: dict[str, list[torch.Tensor]] = {}

    @property
    def quant(self):
        from runtime.quant.spec import QuantSpec
        q = self.manifest.get("quantization")
        return QuantSpec.from_json(q) if q else None

    @property
    def skip_modules(self) -> list[str]:
        return list(self.manifest.get("skip_modules", []))

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest.get("dtype", "bfloat16"))

    def keys(self) -> set[str]:
        return set(self._block_of)

    def get(self, name: str) -> torch.Tensor:
        block = self._block_of[name]
        if block not in self._buffers:
            self._buffers = {block: self._read(block)}       # keep one block at a time
        row = self.rows[block]
        names = [e[0] for e in row["layout"]["entries"]]
        return self._buffers[block][names.index(name)]

    def _read(self, block: str) -> list[torch.Tensor]:
        from safetensors import safe_open
        row = self.rows[block]
        shard = self.root / row["file"]
        try:
            with safe_open(str(shard), framework="pt") as f:
                buf = f.get_tensor("block")
        except Exception as e:
            raise CheckpointError(f"shard {shard} is not readable (truncated or corrupt?): {e}") from e
        if hashlib.sha256(memoryview(buf.numpy())).hexdigest() != row["sha256"]:
            raise CheckpointError(f"shard {shard} is corrupted: its sha256 does not match {MANIFEST}")
        return views(buf, Layout.from_json(row["layout"]))

    def fingerprint(self) -> str:
        return hashlib.sha256("".join(r["sha256"] for r in self.rows.values()).encode()).hexdigest()[:16]

    def close(self) -> None:
        self._buffers = {}
