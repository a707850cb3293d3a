"""Blocks: a model piece's tensors packed into ONE contiguous aligned byte buffer.

A block moves as a single copy (host->GPU) and is read from disk with a single aligned read.
The layout (name, dtype, shape, offset) is a small manifest kept beside the bytes; tensors are
re-created on the other side as views into the buffer, never copied again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TENSOR_ALIGN = 256     # every tensor starts on a 256-byte boundary (vector loads, any dtype)
BLOCK_ALIGN = 4096     # every block's length is a multiple of a page (O_DIRECT reads)

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
    torch.int16, torch.int32, torch.int64, torch.bool)}


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Entry:
    name: str                  # parameter name relative to the model, e.g. "model.layers.3.mlp.up_proj.weight"
    dtype: str                 # "bfloat16", "float32", ...
    shape: tuple[int, ...]
    offset: int                # byte offset in the block buffer
    nbytes: int

    def to_json(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]

    @staticmethod
    def from_json(row: list) -> "Entry":
        return Entry(row[0], row[1], tuple(row[2]), int(row[3]), int(row[4]))


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]
    nbytes: int                # total, a multiple of BLOCK_ALIGN

    def to_json(self) -> dict:
        return {"nbytes": self.nbytes, "entries": [e.to_json() for e in self.entries]}

    @staticmethod
    def from_json(obj: dict) -> "Layout":
        return Layout(tuple(Entry.from_json(r) for r in obj["entries"]), int(obj["nbytes"]))


def plan_layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> Layout:
    """Offsets for tensors of the given (name, dtype, shape), in order."""
    entries, off = [], 0
    for name, dtype, shape in specs:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        entries.append(Entry(name, str(dtype).removeprefix("torch."), tuple(shape), off, n))
        off = _round_up(off + n, TENSOR_ALIGN)
    return Layout(tuple(entries), _round_up(max(off, 1), BLOCK_ALIGN))


def pack(tensors: dict[str, torch.Tensor], layout: Layout, out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy ``tensors`` (converted to the layout's dtypes) into one uint8 buffer."""
    buf = out if out is not None else torch.zeros(layout.nbytes, dtype=torch.uint8)
    for view, e in zip(views(buf, layout), layout.entries):
        src = tensors[e.name]
        if tuple(src.shape) != e.shape:
            raise ValueError(f"tensor {e.name}: shape {tuple(src.shape)} != expected {e.shape}")
        view.copy_(src)
    return buf


def views(buf: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Tensors of the layout as views into ``buf`` (any device), no copies."""
    out = []
    for e in layout.entries:
        raw = buf[e.offset:e.offset + e.nbytes]
        out.append(raw.view(_DTYPES[e.dtype]).view(e.shape))
    return out
