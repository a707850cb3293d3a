"""Unpacking integer codes from the int32 words GPTQ / AWQ checkpoints store them in.

Both formats treat a run of int32 words as one little-endian bit stream: code ``i`` of the run
occupies bits ``[bits*i, bits*(i+1))``, word ``w`` holding stream bits ``[32w, 32w+32)``. For
2, 4 and 8 bits every code sits inside one word (code ``i`` of word ``w`` at bit
``bits*(i % per)``, ``per = 32/bits``); for 3 bits codes 10 and 21 of every 3-word run straddle
a word boundary (the rule is the same bit stream).
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["check_int32", "unpack_int32"]


def check_int32(t: Tensor, name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``t`` is an int32 tensor of ``shape`` (names the tensor)."""
    if t.dtype != torch.int32 or tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected int32 {list(shape)}, got {t.dtype} {list(t.shape)}")


def _stream_bits(words: Tensor) -> Tensor:
    """``[R, W]`` int32 -> ``[R, 32*W]`` uint8 bits (LSB of word 0 first)."""
    if sys.byteorder != "little":
        raise RuntimeError("unpacking 3-bit GPTQ words assumes a little-endian host")
    b = words.contiguous().view(torch.uint8)                                  # [R, 4W] LE bytes
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(words.shape[0], -1)      # [R, 32W]


def _unpack_rows(words: Tensor, bits: int) -> Tensor:
    """Each row of ``words [R, W]`` is a stream of codes: -> ``[R, 32*W/bits]`` int32 codes."""
    R = words.shape[0]
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        codes = (words.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, W, per]
        return codes.reshape(R, -1)
    bitv = _stream_bits(words.to(torch.int32))                                # [R, 32W]
    if bitv.shape[1] % bits:
        raise ValueError(f"{words.shape[1]} int32 words do not hold a whole number of {bits}-bit codes")
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=words.device))
    return (bitv.reshape(R, -1, bits).to(torch.int32) * weights).sum(-1)      # [R, 32W/bits]


def unpack_int32(words: Tensor, bits: int, dim: int) -> Tensor:
    """Codes of ``words`` (2-D int32) packed along ``dim``, as an int32 tensor.

    ``dim=0``: ``[L*bits/32, C] -> [L, C]`` (each column is a stream, as GPTQ's qweight);
    ``dim=1``: ``[R, L*bits/32] -> [R, L]`` (each row is a stream, as GPTQ's qzeros).
    """
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"{bits}-bit codes are not supported (2, 3, 4 or 8)")
    if dim == 0:
        return _unpack_rows(words.t(), bits).t().contiguous()
    return _unpack_rows(words, bits)
