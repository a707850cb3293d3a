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


def write_shard(path: Path, buf: torch.Tensor, layout: Layout) -> str:
    """One block as a safetensors file with 4 KiB-aligned data; returns the data's sha256."""
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
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def write_checkpoint(out_dir: str | Path, blocks: Iterable, pack: Callable, *, config, tokenizer_dir: Callable | None,
                     quant: dict | None, skip_modules: list[str], dtype: torch.dtype, metadata: dict,
                     overwrite: bool = False) -> Path:
    """Write an exa checkpoint; ``pack(block) -> uint8 buffer`` is called once per block, in order."""
    out = Path(out_dir)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blocks").mkdir(parents=True)
    try:
        rows = []
        for i, b in enumerate(blocks):
            buf = pack(b)
            fname = f"blocks/{i:05d}-{b.name}.safetensors"
            sha = write_shard(tmp / fname, buf[: b.layout.nbytes], b.layout)
            rows.append({"name": b.name, "kind": b.kind, "file": fname, "sha256": sha,
                         "nbytes": b.layout.nbytes, "layout": b.layout.to_json()})
        config.save_pretrained(tmp)
        if tokenizer_dir is not None:
            tokenizer_dir(tmp)
        manifest = {"format": "exa", "version": FORMAT_VERSION, "quantization": quant,
                    "skip_modules": list(skip_modules), "dtype": str(dtype).removeprefix("torch."),
                    "blocks": rows, "metadata": metadata}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
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
