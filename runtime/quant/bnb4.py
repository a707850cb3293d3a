"""The "nf4" and "fp4" formats: bitsandbytes-compatible 4-bit codes over per-block absmax.

Layout (see spec.py): W flattened row-major, blocks of g = ``group_size`` consecutive values
(K must be a multiple of g, so blocks never straddle rows; -1 means one block per row):

* ``qweight`` uint8 ``[N*K/2]``: two codes per byte, the FIRST value in the HIGH nibble
  (codes ``[1, 2, 3, 4] -> 0x12, 0x34``), as bitsandbytes' ``quantize_4bit`` stores them.
* ``absmax`` float32 ``[N*K/g]``;  ``W = CODE[q] * absmax`` (fp32, then cast).
* ``double_quant``: ``offset = mean(absmax)`` (float32 ``[1]``); per run of 256 absmax values
  ``absmax2 = max |absmax - offset|`` (float32 ``[ceil(B/256)]``); ``absmax_q`` uint8 ``[B]`` =
  nearest entry of the signed 8-bit dynamic map (:func:`dynamic_map`, bitsandbytes'
  ``create_dynamic_map()``) to ``(absmax - offset) / absmax2``; read back as
  ``DYN[absmax_q] * absmax2 + offset``.

Quantizer (matches bitsandbytes 0.50 on CPU up to the differences listed; see tests):

* ``scaled = clamp(w * (1 / absmax), -1, 1)`` in fp32 (reciprocal multiply, as bnb's CPU and
  CUDA paths do).
* nf4: nearest table value; an exact tie between two neighbours goes to the LOWER value
  (bnb's CUDA decision tree and CPU ``bucketize`` both do this).
* fp4 is sign/magnitude: the sign bit (0b1000) is set iff ``scaled < 0`` and the magnitude is
  the nearest of the 8 magnitudes; an exact tie goes to the LOWER value, as for nf4 (bnb's CPU
  path; bnb's CUDA ``dQuantizeFP4`` sends negative ties to the smaller magnitude instead).
  0 and tiny positives get 0b0000, tiny negatives 0b1000 ("-0", like bnb's CUDA path); bnb 0.50's
  CPU path picks the opposite zero code (tiny positives -> 0b1000, <= 0 -> 0b0000). Both zero
  codes read back as 0, so only those bytes can differ from bnb's CPU output.
* dynamic map (double quant): ``x = (absmax - offset) / absmax2`` (a true division, as bnb's CPU
  ``quantize_blockwise``), the exactly nearest entry, ties to the lower index. bnb 0.50's CPU
  binary search is approximate and sometimes returns the other neighbour (~0.5% of absmax
  codes, off by one); bnb's CUDA search is nearest. A run whose absmax2 is 0 stores 0.0's code.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import Shapes, check_tensors, check_weight, group_of, kernel_linear, reference_linear
from .spec import QuantSpec

__all__ = ["packed_shapes", "quantize", "dequantize", "linear", "code_table", "dynamic_map",
           "pack_nibbles", "unpack_nibbles"]

DQ_BLOCK = 256  # absmax values per second-level block (bitsandbytes' compress_statistics)

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA), float32 values, sorted.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bnb's bias) in code order, divided by 12 (its max).
_FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
_FP4_MAG_ORDER = [0, 1, 6, 7, 4, 5, 2, 3]  # fp4 codes 0..7 sorted by magnitude

_cache: dict[tuple[str, str], Tensor] = {}


def _cached(key: str, device: torch.device, make) -> Tensor:
    k = (key, str(device))
    if k not in _cache:
        _cache[k] = make().to(device)
    return _cache[k]


def code_table(fmt: str, device: torch.device | str = "cpu") -> Tensor:
    """The 16 float32 values of ``fmt`` ("nf4" or "fp4"), indexed by 4-bit code."""
    if fmt == "nf4":
        return _cached("nf4", torch.device(device), lambda: torch.tensor(_NF4, dtype=torch.float32))
    if fmt == "fp4":
        return _cached("fp4", torch.device(device),
                       lambda: torch.tensor(_FP4, dtype=torch.float32) / 12.0)
    raise ValueError(f"no 4-bit code table for {fmt!r}")


def _make_dynamic_map() -> Tensor:
    """Signed 8-bit dynamic map: for e in 0..6, 2**e bin midpoints of linspace(0.1, 1, 2**e + 1)
    scaled by 10**(e-6), both signs, plus 0 and 1; sorted (256 values, fp32 arithmetic)."""
    parts = [torch.zeros(1), torch.ones(1)]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** e + 1, dtype=torch.float32)
        mag = (edges[:-1] + edges[1:]) / 2.0 * (10.0 ** (e - 6))
        parts += [mag, -mag]
    return torch.cat(parts).sort().values


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """The 256 sorted float32 values used for double quantization (``code[0] = -0.99297``)."""
    return _cached("dynamic", torch.device(device), _make_dynamic_map)


def _midpoints(values: Tensor) -> Tensor:
    return (values[:-1] + values[1:]) / 2.0


def packed_shapes(spec: QuantSpec, N: int, K: int) -> Shapes:
    """Names, shapes and dtypes of the packed tensors; ValueError if K % group_size != 0."""
    if spec.fmt not in ("nf4", "fp4"):
        raise ValueError(f"bnb4 handles fmt 'nf4'/'fp4', got {spec.fmt!r}")
    g = group_of(spec, K)
    if g % 2:
        raise ValueError(f"{spec.name}: block size {g} must be even (two codes per byte)")
    B = N * K // g
    if not spec.double_quant:
        return {"qweight": ((N * K // 2,), torch.uint8), "absmax": ((B,), torch.float32)}
    return {"qweight": ((N * K // 2,), torch.uint8), "absmax_q": ((B,), torch.uint8),
            "absmax2": ((-(-B // DQ_BLOCK),), torch.float32), "offset": ((1,), torch.float32)}


def pack_nibbles(q: Tensor) -> Tensor:
    """Codes ``[2n]`` (values < 16) -> ``[n]`` uint8, the first code in the high nibble."""
    q = q.reshape(-1).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2]


def unpack_nibbles(p: Tensor) -> Tensor:
    """``[n]`` uint8 -> codes ``[2n]`` uint8 (high nibble first)."""
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(-1)


def _nearest_codes(scaled: Tensor, fmt: str) -> Tensor:
    """scaled in [-1, 1] -> int64 4-bit codes (tie rules in the module docstring)."""
    if fmt == "nf4":
        return torch.bucketize(scaled, _midpoints(code_table("nf4", scaled.device)))
    mags = code_table("fp4", scaled.device)[_FP4_MAG_ORDER]                 # ascending [8]
    order = torch.tensor(_FP4_MAG_ORDER, device=scaled.device)
    mid, neg = _midpoints(mags), scaled < 0
    idx = torch.where(neg, torch.bucketize(-scaled, mid, right=True),      # ties -> larger |x|
                      torch.bucketize(scaled, mid))                         # ties -> smaller |x|
    return order[idx] | torch.where(neg, 8, 0)


def _dq_absmax(absmax: Tensor) -> dict[str, Tensor]:
    """Double-quantize ``absmax [B]`` fp32 into absmax_q / absmax2 / offset."""
    B = absmax.numel()
    nb = -(-B // DQ_BLOCK)
    offset = absmax.mean()                                                  # fp32 scalar
    d = torch.zeros(nb * DQ_BLOCK, dtype=torch.float32, device=absmax.device)
    d[:B] = absmax - offset
    d = d.reshape(nb, DQ_BLOCK)                                             # [nb, 256]
    absmax2 = d.abs().amax(-1)                                              # [nb]
    x = d / torch.where(absmax2 == 0, torch.ones_like(absmax2), absmax2).unsqueeze(-1)
    dyn = dynamic_map(absmax.device)
    i = (torch.searchsorted(dyn, x.contiguous(), right=True) - 1).clamp(0, dyn.numel() - 2)
    i = i + ((dyn[i + 1] - x).abs() < (x - dyn[i]).abs()).long()          # ties -> lower index
    return {"absmax_q": i.reshape(-1)[:B].to(torch.uint8), "absmax2": absmax2,
            "offset": offset.reshape(1)}


def _absmax_of(t: dict[str, Tensor], spec: QuantSpec) -> Tensor:
    """The per-block absmax as float32 ``[B]``, undoing double quantization if present."""
    if not spec.double_quant:
        return t["absmax"].float()
    q = t["absmax_q"].long()
    a2 = t["absmax2"].float().repeat_interleave(DQ_BLOCK)[: q.numel()]
    return dynamic_map(q.device)[q] * a2 + t["offset"].float()


def quantize(w: Tensor, spec: QuantSpec) -> dict[str, Tensor]:
    """Quantize ``w [N, K]`` (any float dtype, CPU or CUDA) to nf4/fp4 codes + absmax."""
    N, K = check_weight(w, spec)
    packed_shapes(spec, N, K)
    g = group_of(spec, K)
    blocks = w.detach().float().reshape(-1, g)                              # [B, g]
    absmax = blocks.abs().amax(-1)                                          # [B]
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).clamp(-1, 1)
    out = {"qweight": pack_nibbles(_nearest_codes(scaled, spec.fmt))}
    if spec.double_quant:
        out.update(_dq_absmax(absmax))
    else:
        out["absmax"] = absmax
    return out


def dequantize(t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """Plain-torch reference: packed tensors -> ``W [N, K]`` in ``dtype`` (computed in fp32)."""
    check_tensors(t, packed_shapes(spec, N, K), spec)
    g = group_of(spec, K)
    q = unpack_nibbles(t["qweight"]).long()                                 # [N*K]
    vals = code_table(spec.fmt, q.device)[q].reshape(-1, g)                 # [B, g]
    return (vals * _absmax_of(t, spec).unsqueeze(-1)).reshape(N, K).to(dtype)


def linear(x: Tensor, t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
           bias: Optional[Tensor] = None) -> Tensor:
    """``x [..., K] -> [..., N]``: a Triton kernel on CUDA when one exists, else dequant + F.linear."""
    y = kernel_linear(x, t, spec, N, K, bias)
    if y is not None:
        return y
    return reference_linear(x, dequantize(t, spec, N, K, dtype=x.dtype), bias)
