"""Plain-torch references for the quantized-matmul kernels, written from ``runtime/quant/spec.py``.

These are the ground truth the Triton kernels are tested against (and the fallback when no
kernel applies). They favour clarity over speed: unpack every code to int32, dequantize in
float32, cast once to the requested dtype.

``t`` is a mapping of the packed tensors a format stores (``qweight``, ``scales``, ``zeros`` /
``mins``, ``absmax`` or ``absmax_q`` / ``absmax2`` / ``offset``), as named in the spec.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from runtime.quant.spec import QuantSpec

# bitsandbytes' 4-bit code tables (the published NF4 quantiles; FP4 = e2m1 values / 12).
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
            -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
            0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
            0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
_FP4_E2M1 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(v / 12.0 for v in _FP4_E2M1) + tuple(-v / 12.0 for v in _FP4_E2M1)


def code_table(fmt: str) -> torch.Tensor:
    """The 16 float32 values a 4-bit ``nf4`` / ``fp4`` code stands for."""
    if fmt not in ("nf4", "fp4"):
        raise ValueError(f"no 4-bit code table for format {fmt!r}")
    return torch.tensor(NF4_CODE if fmt == "nf4" else FP4_CODE, dtype=torch.float32)


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit "dynamic tree" map used for double-quantized absmax (256 sorted values).

    Seven decades 10**-6 .. 10**0; decade i holds 2**i evenly spaced values (the midpoints of
    2**i equal steps between 0.1 and 1, times 10**(i-6)), each with both signs; plus 0 and 1.
    """
    vals: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * (10.0 ** (i - 6))
        vals += mids.tolist() + (-mids).tolist()
    assert len(vals) == 256
    return torch.tensor(sorted(vals), dtype=torch.float32)


def _group(spec: QuantSpec, K: int) -> int:
    return K if spec.group_size == -1 else spec.group_size


def unpack_int(qweight: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    """uint8 ``[N, K*bits/8]`` -> int32 codes ``[N, K]`` (layout of the ``int`` format)."""
    q = qweight.reshape(N, -1).to(torch.int32)
    if bits == 8:
        return q[:, :K].contiguous()
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
        codes = (q[:, :, None] >> shifts) & ((1 << bits) - 1)       # [N, K/per, per]
        return codes.reshape(N, -1)[:, :K].contiguous()
    if bits == 3:
        low = unpack_int(q[:, : K // 4].to(torch.uint8), 2, N, K)   # low 2 bits, 4 per byte
        hi_bytes = q[:, K // 4: K // 4 + K // 8]
        shifts = torch.arange(8, device=q.device, dtype=torch.int32)
        high = ((hi_bytes[:, :, None] >> shifts) & 1).reshape(N, -1)[:, :K]
        return low | (high << 2)
    raise ValueError(f"int format has no {bits}-bit layout")


def dequant_int(t: Mapping[str, torch.Tensor], spec: QuantSpec, N: int, K: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``int`` format's weight ``W [N, K]`` in ``dtype`` (computed in float32)."""
    g = _group(spec, K)
    q = unpack_int(t["qweight"], spec.bits, N, K).float()                      # [N, K]
    s = t["scales"].reshape(N, -1).float().repeat_interleave(g, dim=1)[:, :K]
    if spec.sym:
        w = (q - 2 ** (spec.bits - 1)) * s
    elif spec.zero_mode == "int":
        z = t["zeros"].reshape(N, -1).float().repeat_interleave(g, dim=1)[:, :K]
        w = (q - z) * s
    else:
        m = t["mins"].reshape(N, -1).float().repeat_interleave(g, dim=1)[:, :K]
        w = q * s + m
    return w.to(dtype)


def nf4_absmax(t: Mapping[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """float32 absmax of every block, undoing double quantization when the spec uses it."""
    if not spec.double_quant:
        return t["absmax"].float().reshape(-1)
    code = dynamic_map().to(t["absmax_q"].device)
    a = code[t["absmax_q"].reshape(-1).long()]
    a2 = t["absmax2"].float().reshape(-1).repeat_interleave(256)[: a.numel()]
    return a * a2 + t["offset"].float().reshape(-1)[0]


def unpack_nf4(qweight: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """uint8 ``[N*K/2]`` -> int64 codes ``[N*K]`` (flattened row-major, high nibble first)."""
    b = qweight.reshape(-1).long()
    return torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[: N * K]


def dequant_nf4(t: Mapping[str, torch.Tensor], spec: QuantSpec, N: int, K: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``nf4`` / ``fp4`` format's weight ``W [N, K]`` in ``dtype`` (computed in float32)."""
    code = code_table(spec.fmt).to(t["qweight"].device)
    q = unpack_nf4(t["qweight"], N, K)
    absmax = nf4_absmax(t, spec).repeat_interleave(_group(spec, K))[: N * K]
    return (code[q] * absmax).reshape(N, K).to(dtype)


def dequant(t: Mapping[str, torch.Tensor], spec: QuantSpec, N: int, K: int,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W [N, K]`` for any format the kernels cover (``int``, ``nf4``, ``fp4``)."""
    if spec.fmt == "int":
        return dequant_int(t, spec, N, K, dtype)
    if spec.fmt in ("nf4", "fp4"):
        return dequant_nf4(t, spec, N, K, dtype)
    raise ValueError(f"the kernel reference has no dequantizer for format {spec.fmt!r}")


def ref_linear(x: torch.Tensor, t: Mapping[str, torch.Tensor], spec: QuantSpec, N: int, K: int,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with W dequantized to ``x.dtype``: what every kernel must compute."""
    w = dequant(t, spec, N, K, x.dtype)
    return F.linear(x, w, bias)


def random_quantized(spec: QuantSpec, N: int, K: int, device="cpu",
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Fresh random packed tensors of ``spec``'s layout for W [N, K] (every byte random).

    Drawn directly on ``device`` (``generator`` must live there too). Scales are sized so that
    ``x @ W.T`` stays O(1) for unit-variance x.
    """
    device = torch.device(device)
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.rand(*shape, generator=gen, device=device)

    def u8(n, high=256):
        return torch.randint(0, high, (n,), generator=gen, device=device, dtype=torch.uint8)

    amp = 1.0 / K ** 0.5
    if spec.fmt == "int":
        g = _group(spec, K)
        t = {"qweight": u8(N * K * spec.bits // 8).reshape(N, -1),
             "scales": ((0.5 + rnd(N, K // g)) * amp * 2 ** (2 - spec.bits)).half()}
        if not spec.sym and spec.zero_mode == "int":
            t["zeros"] = u8(N * (K // g), 2 ** spec.bits).reshape(N, K // g)
        elif not spec.sym:
            t["mins"] = (-(0.5 + rnd(N, K // g)) * amp * 2).half()
    elif spec.fmt in ("nf4", "fp4"):
        nb = N * K // _group(spec, K)
        t = {"qweight": u8(N * K // 2)}
        if spec.double_quant:
            t["absmax_q"] = u8(nb)
            t["absmax2"] = (0.5 + rnd((nb + 255) // 256)) * amp * 4
            t["offset"] = torch.full((1,), amp * 2, dtype=torch.float32, device=device)
        else:
            t["absmax"] = (0.5 + rnd(nb)) * amp * 2
    else:
        raise ValueError(f"random_quantized does not cover format {spec.fmt!r}")
    return t
