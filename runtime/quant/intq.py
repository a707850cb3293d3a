"""The "int" format: 2/3/4/8-bit integer codes, group-wise along K (or per output channel).

Layout (see spec.py): ``qweight`` uint8 ``[N, K*bits/8]``, ``scales`` float16 ``[N, G]``, and
for asymmetric grids ``zeros`` uint8 ``[N, G]`` (zero_mode "int") or ``mins`` float16
``[N, G]`` (zero_mode "min"). Codes are packed along K inside each row:

* bits 8: one code per byte.
* bits 4: code k in byte k//2, LOW nibble for even k  (``[1, 2, 3, 4] -> 0x21, 0x43``).
* bits 2: code k in byte k//4 at bit 2*(k%4)          (``[0, 1, 2, 3] -> 0xE4``).
* bits 3: two planes, one after the other in the row: the low 2 bits packed as bits 2
  (K/4 bytes), then the high bit, 8 codes per byte, code k at bit k%8 (K/8 bytes).

Grids and RTN quantizer (all arithmetic in float32, scales rounded to float16 BEFORE the codes
are computed, so the codes are nearest for the stored scale; ``torch.round`` = ties to even):

* sym:         ``s = absmax / (2**(b-1) - 1)``, ``q = clamp(round(w/s) + 2**(b-1), 0, 2**b-1)``,
               ``W = (q - 2**(b-1)) * s``. The grid is symmetric, ``+-absmax`` are exact, code 0
               is never produced (it still dequantizes to ``-2**(b-1) * s`` for imported grids).
* asym "int":  GPTQ style. ``lo = min(min w, 0)``, ``hi = max(max w, 0)``,
               ``s = (hi - lo) / (2**b-1)``, ``z = clamp(round(-lo/s), 0, 2**b-1)`` (uint8),
               ``q = clamp(round(w/s) + z, 0, 2**b-1)``, ``W = (q - z) * s``.
* asym "min":  GGUF Q4_1 style. ``s = (max - min) / (2**b-1)``, ``m = min`` (float16),
               ``q = clamp(round((w - m)/s), 0, 2**b-1)``, ``W = q * s + m`` (fp32 mul, then add).

Max error per group is s/2 plus float16 rounding of s/m (<= 2**-11 of the group's range).
A group whose scale is 0 (all zeros, or constant for "min") dequantizes exactly; scales that
underflow float16 dequantize to 0 (or m). Weights too large for float16 scales raise ValueError.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import Shapes, check_tensors, check_weight, group_of, kernel_linear, reference_linear
from .spec import QuantSpec

__all__ = ["packed_shapes", "quantize", "dequantize", "linear", "pack_codes", "unpack_codes"]


def packed_shapes(spec: QuantSpec, N: int, K: int) -> Shapes:
    """Names, shapes and dtypes of the packed tensors of an ``[N, K]`` weight.

    Raises ValueError if spec is not an "int" spec, if K is not divisible by the group size,
    or if K*bits is not a whole number of bytes (3 bits needs K % 8 == 0).
    """
    if spec.fmt != "int":
        raise ValueError(f"intq handles fmt 'int', got {spec.fmt!r}")
    g = group_of(spec, K, ragged=True)
    need = {8: 1, 4: 2, 2: 4, 3: 8}[spec.bits]
    if K % need:
        raise ValueError(f"{spec.name}: in_features K={K} must be a multiple of {need} "
                         f"to pack {spec.bits}-bit codes")
    G = -(-K // g)                                   # the last group may be shorter
    shapes: Shapes = {"qweight": ((N, K * spec.bits // 8), torch.uint8),
                      "scales": ((N, G), torch.float16)}
    if not spec.sym:
        if spec.zero_mode == "int":
            shapes["zeros"] = ((N, G), torch.uint8)
        else:
            shapes["mins"] = ((N, G), torch.float16)
    return shapes


# ----------------------------------------------------------------------------- packing

def _shifts(bits: int, device: torch.device) -> Tensor:
    return torch.arange(0, 8, bits, device=device, dtype=torch.int32)  # [8/bits]


def _pack_dense(q: Tensor, bits: int) -> Tensor:
    """[N, K] codes < 2**bits (bits 1/2/4) -> [N, K*bits/8] uint8, code k at bit bits*(k%per)."""
    per = 8 // bits
    qg = q.to(torch.int32).reshape(q.shape[0], -1, per)            # [N, K/per, per]
    return (qg << _shifts(bits, q.device)).sum(-1).to(torch.uint8)  # bits never overlap: sum == or


def _unpack_dense(p: Tensor, bits: int) -> Tensor:
    """[N, K*bits/8] uint8 -> [N, K] uint8 codes (inverse of _pack_dense)."""
    mask = (1 << bits) - 1
    q = (p.to(torch.int32).unsqueeze(-1) >> _shifts(bits, p.device)) & mask  # [N, K/per, per]
    return q.reshape(p.shape[0], -1).to(torch.uint8)


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``q [N, K]`` (values < 2**bits) into ``qweight [N, K*bits/8]`` uint8."""
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    if bits == 3:
        q = q.to(torch.uint8)
        return torch.cat([_pack_dense(q & 3, 2), _pack_dense(q >> 2, 1)], dim=1)  # [N, K/4 + K/8]
    return _pack_dense(q, bits)


def unpack_codes(p: Tensor, bits: int, K: int) -> Tensor:
    """Unpack ``qweight [N, K*bits/8]`` into uint8 codes ``[N, K]``."""
    if bits == 8:
        return p
    if bits == 3:
        low = _unpack_dense(p[:, : K // 4], 2)                        # [N, K] low 2 bits
        high = _unpack_dense(p[:, K // 4:], 1)                        # [N, K] high bit
        return low | (high << 2)
    return _unpack_dense(p, bits)


# ----------------------------------------------------------------------------- quantize

def _to_half(x: Tensor, spec: QuantSpec, what: str) -> Tensor:
    h = x.to(torch.float16)
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{spec.name}: {what} overflow float16 (weights too large, max |w| "
                         f"{float(x.abs().max()):.3g})")
    return h


def _safe(s: Tensor) -> Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def _pad_groups(w: Tensor, g: int) -> Tensor:
    """``[N, K] -> [N, G, g]``; a short last group is padded with its row's last value, which
    leaves that group's min, max and absmax unchanged (the padding is cut off afterwards)."""
    N, K = w.shape
    pad = -K % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(N, pad)], dim=1)
    return w.reshape(N, -1, g)


def quantize(w: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """Round-to-nearest quantization of ``w [N, K]`` (any float dtype, CPU or CUDA)."""
    N, K = check_weight(w, spec)
    packed_shapes(spec, N, K)                                  # validates K
    g = group_of(spec, K, ragged=True)
    maxq = (1 << spec.bits) - 1
    wg = _pad_groups(w.detach().float(), g)                      # [N, G, g]
    out: dict[str, Tensor] = {}
    if spec.sym:
        c = 1 << (spec.bits - 1)
        s16 = _to_half(wg.abs().amax(-1) / (c - 1), spec, "scales")                 # [N, G]
        q = torch.round(wg / _safe(s16.float()).unsqueeze(-1)) + c
    elif spec.zero_mode == "int":
        lo = wg.amin(-1).clamp(max=0.0)                                              # [N, G]
        hi = wg.amax(-1).clamp(min=0.0)
        s16 = _to_half((hi - lo) / maxq, spec, "scales")
        sf = _safe(s16.float())
        z = torch.round(-lo / sf).clamp(0, maxq)                                     # [N, G]
        q = torch.round(wg / sf.unsqueeze(-1)) + z.unsqueeze(-1)
        out["zeros"] = z.to(torch.uint8)
    else:
        lo = wg.amin(-1)
        m16 = _to_half(lo, spec, "mins")
        s16 = _to_half((wg.amax(-1) - lo) / maxq, spec, "scales")
        q = torch.round((wg - m16.float().unsqueeze(-1)) / _safe(s16.float()).unsqueeze(-1))
        out["mins"] = m16
    q = q.clamp(0, maxq).to(torch.uint8).reshape(N, -1)[:, :K]  # [N, K]
    return {"qweight": pack_codes(q, spec.bits), "scales": s16, **out}


def dequantize(t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Plain-torch reference: packed tensors -> ``W [N, K]`` in ``dtype`` (computed in fp32)."""
    check_tensors(t, packed_shapes(spec, N, K), spec)
    g = group_of(spec, K, ragged=True)
    q = _pad_groups(unpack_codes(t["qweight"], spec.bits, K).float(), g)          # [N, G, g]
    s = t["scales"].float().unsqueeze(-1)                                          # [N, G, 1]
    if spec.sym:
        w = (q - float(1 << (spec.bits - 1))) * s
    elif spec.zero_mode == "int":
        w = (q - t["zeros"].float().unsqueeze(-1)) * s
    else:
        w = q * s + t["mins"].float().unsqueeze(-1)
    return w.reshape(N, -1)[:, :K].to(dtype)


def linear(x: Tensor, t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
           bias: Optional[Tensor] = None) -> Tensor:
    """``x [..., K] -> [..., N]``: a Triton kernel on CUDA when one exists, else dequant + F.linear."""
    y = kernel_linear(x, t, spec, N, K, bias)
    if y is not None:
        return y
    return reference_linear(x, dequantize(t, spec, N, K, dtype=x.dtype), bias)
