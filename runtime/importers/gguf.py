"""GGUF quantized tensors -> exa's ``int`` format, block by block, exactly where the grids match.

A GGUF tensor ``W [N, K]`` is stored row by row (``N`` rows of ``K/B`` blocks of ``B`` values);
each block is a fixed run of bytes. Values of block-local element ``e`` (``q`` = its code):

* ``Q4_0``  (B 32, 18 bytes): fp16 ``d``, 16 bytes of nibbles; element ``j < 16`` is the LOW
  nibble of byte ``j``, element ``j + 16`` its HIGH nibble. ``w = (q - 8) * d``.
* ``Q4_1``  (B 32, 20 bytes): fp16 ``d``, fp16 ``m``, 16 nibble bytes as Q4_0. ``w = q * d + m``.
* ``Q8_0``  (B 32, 34 bytes): fp16 ``d``, 32 int8 codes. ``w = q * d``.
* ``Q4_K``  (B 256, 144 bytes): fp16 ``d``, fp16 ``dmin``, 12 bytes of eight 6-bit sub-block
  scales ``sc`` and mins ``mn`` (sub-block ``j < 4``: ``sc`` = low 6 bits of byte ``j``, ``mn`` =
  low 6 bits of byte ``4+j``; ``j >= 4``: low / high nibble of byte ``8+j-4`` plus, as bits 4-5,
  the top two bits of byte ``j-4`` / ``j``), 128 nibble bytes: sub-block ``2c`` is the low
  nibbles of bytes ``32c .. 32c+31``, sub-block ``2c+1`` their high nibbles.
  ``w = (d*sc) * q - (dmin*mn)`` (both products in fp32).
* ``Q6_K``  (B 256, 210 bytes): 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits),
  16 int8 sub-block scales (16 values each), fp16 ``d``. Element ``128h + 32j + l``
  (``h < 2, j < 4, l < 32``): low bits = nibble ``j >= 2`` (high) / ``j < 2`` (low) of
  ``ql[64h + 32(j % 2) + l]``, high bits = ``(qh[32h + l] >> 2j) & 3``.
  ``w = (d*sc) * (q - 32)``.

Conversion (``NATIVE`` gives each type's exa spec; ``convert`` returns ``exact``):

* Q4_0 -> int4 g32 sym: codes as they are, ``scales = d``; exa's symmetric zero is ``2**3 = 8``,
  the same grid: exact. Q4_0 also goes into int4 g32 "min" exactly (``mins = -8d``, a power-of-two
  multiple of an fp16, unless it overflows).
* Q4_1 -> int4 g32 "min": ``scales = d``, ``mins = m``: exact.
* Q8_0 -> 8-bit g32 sym ``int``: exa stores uint8 codes around 128, ``q_exa = q + 128``: exact.
* Q4_K -> int4 g32 "min": codes kept, ``scales = fp16(d*sc)``, ``mins = fp16(-dmin*mn)``; exact
  iff those fp32 products are fp16 numbers (``exact`` says so), else nearest (each scale / min
  rounded to fp16, relative error <= 2**-11; the codes are unchanged).
* Q6_K -> 8-bit g16 sym ``int``: ``q_exa = q + 96``, ``scales = fp16(d*sc)``: exact iff the
  products are fp16 numbers, else nearest as for Q4_K.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from runtime.quant.intq import pack_codes
from runtime.quant.spec import QuantSpec

__all__ = ["BLOCK", "NATIVE", "convert", "convertible", "decode"]

NATIVE: dict[str, QuantSpec] = {
    "Q4_0": QuantSpec("int", 4, 32, sym=True),
    "Q4_1": QuantSpec("int", 4, 32, sym=False, zero_mode="min"),
    "Q8_0": QuantSpec("int", 8, 32, sym=True),
    "Q4_K": QuantSpec("int", 4, 32, sym=False, zero_mode="min"),
    "Q6_K": QuantSpec("int", 8, 16, sym=True),
}
BLOCK = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def convertible(ttype: str, spec: QuantSpec) -> bool:
    """Whether tensors of ``ttype`` go into ``spec`` (natively, or Q4_0 into the "min" grid)."""
    if ttype not in NATIVE:
        return False
    return NATIVE[ttype] == spec or (ttype == "Q4_0" and spec == NATIVE["Q4_1"])


def _f16(b: Tensor) -> Tensor:
    """``[..., 2]`` uint8 (little-endian fp16 bytes) -> float32 ``[...]``."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(b: Tensor) -> tuple[Tensor, Tensor]:
    return b & 15, b >> 4


def decode(raw: Tensor, ttype: str, K: int) -> dict[str, Tensor]:
    """Raw rows ``[N, K/B*bytes]`` uint8 -> codes ``q`` uint8 ``[N, K]`` and per-group fp32 factors.

    Returns ``{"q", "s"}`` (+ ``"m"``): with group length ``g`` (32, or 16 for Q6_K), the value is
    ``(q - c) * s`` for the symmetric types (c = 8, 0 (Q8_0 codes are signed: q holds q+128 and
    c = 128), 32) or ``q * s + m`` (Q4_1, Q4_K: m is the signed offset, ``-dmin*mn`` for Q4_K).
    ``s`` / ``m`` are ``[N, K/g]`` float32, computed as GGUF's reference dequantizer does.
    """
    if ttype not in BLOCK:
        raise ValueError(f"GGUF type {ttype} has no exact exa conversion")
    B, nb = BLOCK[ttype]
    N = raw.shape[0]
    if K % B or raw.shape[1] != K // B * nb:
        raise ValueError(f"{ttype}: rows of {raw.shape[1]} bytes do not hold {K} values")
    x = raw.reshape(N, K // B, nb)                                     # [N, nblk, bytes]
    if ttype in ("Q4_0", "Q4_1"):
        d = _f16(x[..., 0:2])                                          # [N, nblk]
        lo, hi = _nibbles(x[..., -16:])
        q = torch.cat([lo, hi], dim=-1).reshape(N, K)
        out = {"q": q, "s": d}
        if ttype == "Q4_1":
            out["m"] = _f16(x[..., 2:4])
        return out
    if ttype == "Q8_0":
        q = x[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128
        return {"q": q.to(torch.uint8).reshape(N, K), "s": _f16(x[..., 0:2])}
    if ttype == "Q4_K":
        d, dmin = _f16(x[..., 0:2]), _f16(x[..., 2:4])                  # [N, nblk]
        sc, mn = _k4_scales(x[..., 4:16])                               # [N, nblk, 8] each
        lo, hi = _nibbles(x[..., 16:].reshape(N, K // B, 4, 32))
        q = torch.stack([lo, hi], dim=3).reshape(N, K)                  # sub-blocks 2c, 2c+1
        s = (d.unsqueeze(-1) * sc.float()).reshape(N, -1)
        m = -(dmin.unsqueeze(-1) * mn.float()).reshape(N, -1)
        return {"q": q, "s": s, "m": m}
    # Q6_K
    ql = x[..., 0:128].reshape(N, -1, 2, 2, 32)                          # [N, nblk, h, j%2, l]
    qh = x[..., 128:192].reshape(N, -1, 2, 1, 32)                       # [N, nblk, h, 1, l]
    sc = x[..., 192:208].contiguous().view(torch.int8).float()          # [N, nblk, 16]
    d = _f16(x[..., 208:210])
    low = torch.cat([ql & 15, ql >> 4], dim=3)                          # [N, nblk, h, j, l]
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8).reshape(1, 1, 1, 4, 1)
    high = (qh >> shifts) & 3                                           # [N, nblk, h, j, l]
    q = (low | (high << 4)).reshape(N, K)
    return {"q": q, "s": (d.unsqueeze(-1) * sc).reshape(N, -1)}


def _k4_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 12 scale bytes ``[..., 12]`` -> (sc, mn) ``[..., 8]`` 6-bit values (uint8)."""
    a, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([a & 63, (md & 15) | ((a >> 6) << 4)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 6) << 4)], dim=-1)
    return sc, mn


def _half(x: Tensor, what: str) -> tuple[Tensor, bool]:
    h = x.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"GGUF {what} overflow float16: cannot store them in exa's format")
    return h, bool(torch.equal(h.float(), x))


def convert(raw: Tensor, ttype: str, spec: QuantSpec, K: int) -> tuple[dict[str, Tensor], bool]:
    """Raw GGUF rows -> (exa packed tensors of ``spec``, exact). ValueError if not convertible."""
    if not convertible(ttype, spec):
        raise ValueError(f"GGUF {ttype} cannot be stored as {spec.name}")
    t = decode(raw, ttype, K)
    q, s = t["q"], t["s"]
    if ttype == "Q6_K":
        q = q + 96                                                      # (q - 32) + 128
    scales, exact = _half(s, f"{ttype} scales")
    out = {"qweight": pack_codes(q.contiguous(), spec.bits), "scales": scales}
    if not spec.sym:
        m = t["m"] if "m" in t else -8.0 * s                            # Q4_0 into the "min" grid
        out["mins"], exact_m = _half(m, f"{ttype} mins")
        exact = exact and exact_m
    return out, exact


def raw_rows(data: np.ndarray) -> Tensor:
    """A GGUFReader tensor's data (numpy, ``[N, row_bytes]`` uint8) as a torch tensor (copied)."""
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).copy())
