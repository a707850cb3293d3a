"""Quantized linear layers on the host CPU (hybrid execution): torch's CPU kernels, or a fallback.

A block computed on the CPU keeps its packed weights in host RAM; its linears run here on all
cores (``torch.get_num_threads()``; never changed here). ``prepare`` converts one linear's exa
tensors, once at load, into the layout of a fast torch CPU kernel:

* ``int`` 4-bit (sym, asym "int", asym "min"), any group size that a torch group of 256 / 128
  / 64 / 32 divides (per-channel included), ``N % 16 == 0`` ->
  ``aten._weight_int4pack_mm_for_cpu``, which computes ``W = (q - 8) * scale + zero`` per group:
  ``scale = s`` and ``zero = (8 - z) * s`` (sym: z = 8; "min": ``zero = 8 s + m``). In fp32
  (fp32 activations) this is exact for sym / asym "int" (``(q - z) * s`` needs <= 15 bits of
  mantissa); "min" rounds ``8 s + m`` once. With bf16 / fp16 activations torch's fast path
  needs bf16 activations, scales and zeros: x is cast to bf16 and scale / zero are rounded to
  bf16 (relative 2**-9: a weight moves by at most ~s/32, a sixteenth of int4's own rounding).
* ``int`` 8-bit symmetric per-channel -> ``aten._weight_int8pack_mm`` (``W = (q - 128) * s``).

Everything else (nf4 / fp4, int 2 / 3-bit, LLM.int8, shapes the kernels refuse, a torch without
them) runs the format's own reference ``linear`` on CPU tensors, a slice of output rows at a
time so the dequantized temporary stays small. ``int4_supported`` self-tests the int4 kernel
once (layout and formula), so a torch whose kernel differs falls back instead of being wrong.

The int4 conversion is on the load path of every CPU-computed block, so it builds torch's
packed layout directly from exa's packed bytes (nibble selects + a byte transpose, no int32
codes; ~10x faster than unpacking for torch's packing op, which stays the fallback and the
reference that the layout is matched against, see ``_int4_layout``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

from runtime.quant.spec import QuantSpec

__all__ = ["Prepared", "kernel_kind", "kernel_dtype", "converted_nbytes", "prepare", "linear",
           "int4_supported"]

INT4_GROUPS = (256, 128, 64, 32)     # group sizes torch's CPU int4 kernel accepts
_CONVERT_ROWS = 1024                 # rows torch's op converts at once (a multiple of its 64-row tile)
_CONVERT_BYTES = 2 << 20             # packed bytes the direct packing converts at once, per thread
_FALLBACK_ELEMS = 1 << 22            # dequantized elements per fallback slice (16 MiB in fp32)


@dataclass(frozen=True)
class Prepared:
    """One linear converted for a torch CPU kernel (host tensors)."""

    kind: str          # "int4" | "int8"
    weight: Tensor     # int4: uint8 [N, K/2] (torch's packing); int8: int8 [N, K]
    scales: Tensor     # int4: [K/group, N, 2] (scale, zero); int8: [N]; in ``dtype``
    group: int         # int4: torch's group size; int8: K
    dtype: torch.dtype  # activations, scales and result dtype of the kernel


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The CPU kernel's activation dtype for a model computing in ``dtype``."""
    return torch.bfloat16 if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _int4_group(spec: QuantSpec, K: int) -> Optional[int]:
    g = K if spec.group_size == -1 else spec.group_size
    return next((gs for gs in INT4_GROUPS if g % gs == 0 and K % gs == 0), None)


def kernel_kind(spec: QuantSpec, N: int, K: int) -> Optional[str]:
    """"int4" / "int8" when a torch CPU kernel serves this format and shape here, else None."""
    if spec.fmt != "int":
        return None
    if spec.bits == 4 and N % 16 == 0 and _int4_group(spec, K) is not None and int4_supported():
        return "int4"
    if spec.bits == 8 and spec.sym and spec.group_size in (-1, K) and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        return "int8"
    return None


def converted_nbytes(spec: QuantSpec, N: int, K: int, dtype: torch.dtype) -> int:
    """Host bytes of ``prepare``'s result (0 when the fallback reads the exa tensors as they are)."""
    kind, esize = kernel_kind(spec, N, K), torch.empty((), dtype=kernel_dtype(dtype)).element_size()
    if kind == "int4":
        return N * K // 2 + K // _int4_group(spec, K) * N * 2 * esize
    if kind == "int8":
        return N * K + N * esize
    return 0


def _int4_scales(spec: QuantSpec, t: Mapping[str, Tensor], K: int, gs: int, dtype) -> Tensor:
    """exa's per-group (s, z | m) -> torch's ``[K/gs, N, 2]`` (scale, zero) with W = (q-8)*scale + zero.

    Built as (scale, zero) pairs ``[N, G, 2]`` in ``dtype`` (zero computed in fp32, each rounded
    once), transposed with each pair as one 4 / 8-byte unit (torch's blocked 2-D transpose), each
    exa group then repeated for the ``g / gs`` torch groups it spans.
    """
    s = t["scales"]                                                     # [N, G] float16
    N, G = s.shape
    pair = torch.empty(N, G, 2, dtype=dtype)
    pair[..., 0] = s
    if spec.sym:
        pair[..., 1] = 0.0
    elif spec.zero_mode == "int":
        pair[..., 1] = (8.0 - t["zeros"].float()) * s.float()
    else:
        pair[..., 1] = 8.0 * s.float() + t["mins"].float()
    r = (K if spec.group_size == -1 else spec.group_size) // gs        # torch groups per exa group
    unit = {4: torch.int32, 8: torch.int64}[2 * pair.element_size()]
    out = torch.empty(G, r, N, 2, dtype=dtype)
    words = pair.view(unit).view(N, G).t()                              # [G, N] (scale, zero) units
    if r == 1:
        out.view(unit).view(G, N).copy_(words)
    else:
        out.view(unit).view(G, r, N).copy_(words.contiguous().unsqueeze(1))
    out = out.view(G * r, N, 2)
    return out if G * r == K // gs else out[: K // gs].clone()         # a short last exa group


# -- int4 weights in torch's packing --------------------------------------------------------
# torch's CPU int4 kernel (aten/src/ATen/native/cpu/int4mm_kernel.cpp, weight_to_int4pack_kernel)
# packs N in blocks of BN rows (64 with AVX-512, 32 with AVX2 / no vector unit, 16 on NEON), the
# last block possibly shorter; block b is a contiguous ``[K, nb/2]`` uint8 array whose byte
# (k, j) holds the codes of two of its rows at k, one per nibble: rows (j, j + nb/2) ("halves")
# in a full block of the vectorised layouts, rows (2j, 2j + 1) ("pairs") otherwise. exa's rows
# hold two codes per byte along K (low nibble first), so each output byte is two nibble
# selects and a byte transpose: no int32 codes. ``_int4_layout`` finds (BN, halves) by matching
# torch's own op byte for byte; without a match, ``_torch_pack`` (torch's op) is used.

def _torch_pack(qweight: Tensor, K: int) -> Tensor:
    """torch's own packing op on exa's codes (unpacked to int32 in slices of rows)."""
    from runtime.quant.intq import unpack_codes
    convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    parts = [convert(unpack_codes(qweight[i:i + _CONVERT_ROWS], 4, K).to(torch.int32).contiguous(), 2)
             for i in range(0, qweight.shape[0], _CONVERT_ROWS)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _pack_blocks(q: Tensor, out: Tensor, nb: int, halves: bool) -> None:
    """Rows of whole blocks of ``nb`` rows: ``q [R, K/2]`` exa codes -> ``out [R, K/2]`` torch's."""
    R, kb = q.shape
    h = nb // 2
    if halves:                                                   # byte (k, j): rows j, j + h
        qb = q.reshape(R // nb, 2, h, kb)
    else:                                                        # byte (k, j): rows 2j, 2j + 1
        qb = q.reshape(R // nb, h, 2, kb).transpose(1, 2)
    lo, hi = qb[:, 0], qb[:, 1]                                  # [B, h, K/2]: low / high nibble rows
    o = out.view(R // nb, kb, 2, h)                              # [B, K/2, k % 2, h]
    even = lo & 0x0F                                             # codes at even k
    even |= hi << 4                                              # uint8: the shift drops hi's high nibble
    o[:, :, 0].copy_(even.transpose(1, 2))
    odd = lo >> 4                                                # codes at odd k
    odd |= hi & 0xF0
    o[:, :, 1].copy_(odd.transpose(1, 2))


def _direct_pack(qweight: Tensor, K: int, bn: int, halves: bool) -> Tensor:
    """exa's ``qweight [N, K/2]`` -> torch's packing ``[N, K/2]`` for layout (bn, halves)."""
    N, kb = qweight.shape
    out = torch.empty(N, kb, dtype=torch.uint8)
    full = N - N % bn
    step = max(1, _CONVERT_BYTES * torch.get_num_threads() // (kb * bn)) * bn   # whole blocks at once
    for r0 in range(0, full, step):
        r1 = min(full, r0 + step)
        _pack_blocks(qweight[r0:r1], out[r0:r1], bn, halves)
    if full < N:                                                 # the short last block: pairs
        _pack_blocks(qweight[full:], out[full:], N - full, False)
    return out


@functools.lru_cache(maxsize=None)
def _int4_layout() -> Optional[tuple[int, bool]]:
    """torch's int4 packing here as (BN, halves), found by matching its op on probes; None: none fits."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None
    g, K = torch.Generator().manual_seed(0), 64
    probes = [torch.randint(0, 256, (n, K // 2), dtype=torch.uint8, generator=g) for n in (16, 48, 80, 208, 240)]
    try:
        want = [_torch_pack(q, K) for q in probes]
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    for lay in ((64, True), (32, True), (16, True), (16, False), (32, False), (64, False)):
        if all(torch.equal(_direct_pack(q, K, *lay), w) for q, w in zip(probes, want)):
            return lay
    return None


def _int4_weight(qweight: Tensor, K: int) -> Tensor:
    """exa's int4 ``qweight [N, K/2]`` -> torch's CPU packing (directly when the layout is known)."""
    lay = _int4_layout()
    return _torch_pack(qweight, K) if lay is None else _direct_pack(qweight, K, *lay)


def prepare(spec: QuantSpec, t: Mapping[str, Tensor], N: int, K: int, dtype: torch.dtype) -> Optional[Prepared]:
    """Convert one linear's packed exa tensors (host) for a fast CPU kernel, or None (fallback).

    ``dtype`` is the model's compute dtype (the activations' dtype).
    """
    kind, kd = kernel_kind(spec, N, K), kernel_dtype(dtype)
    if kind == "int4":
        gs = _int4_group(spec, K)
        return Prepared("int4", _int4_weight(t["qweight"], K), _int4_scales(spec, t, K, gs, kd), gs, kd)
    if kind == "int8":
        w = (t["qweight"].to(torch.int16) - 128).to(torch.int8).contiguous()      # [N, K]
        return Prepared("int8", w, t["scales"].reshape(N).to(kd).contiguous(), K, kd)
    return None


def linear(x: Tensor, spec: QuantSpec, t: Mapping[str, Tensor], N: int, K: int,
           prepared: Optional[Prepared] = None, bias: Optional[Tensor] = None,
           perm: Optional[Tensor] = None) -> Tensor:
    """``x [..., K] @ W.T (+ bias)`` -> ``[..., N]`` in x.dtype, all on the CPU.

    Args:
        x: host activations. t: the exa packed tensors (host). prepared: ``prepare``'s result,
        or None for the format's reference path. bias: ``[N]`` or None. perm: the act-order
        input permutation (int32 ``[K]``) or None.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)                                                          # [M, K]
    if perm is not None:
        x2 = x2.index_select(1, perm.long())
    if prepared is None:
        y = _fallback(x2, spec, t, N, K)
    elif prepared.kind == "int4":
        xk = x2.to(prepared.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xk, prepared.weight, prepared.group, prepared.scales)
    else:
        y = torch.ops.aten._weight_int8pack_mm(x2.to(prepared.dtype).contiguous(), prepared.weight,
                                               prepared.scales)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, N)


def _row_slice(t: Mapping[str, Tensor], N: int, n0: int, n1: int) -> dict[str, Tensor]:
    """Output rows n0:n1 of packed tensors that are row-major per output feature."""
    out = {}
    for k, v in t.items():
        per = v.numel() // N if v.dim() == 1 else None
        out[k] = v[n0:n1] if v.dim() == 2 else v[n0 * per:n1 * per]
    return out


def _fallback(x2: Tensor, spec: QuantSpec, t: Mapping[str, Tensor], N: int, K: int) -> Tensor:
    from runtime.quant import module_for
    fmt = module_for(spec)
    rows = max(1, _FALLBACK_ELEMS // K)
    if spec.double_quant or rows >= N:          # double-quant statistics span rows: whole weight
        return fmt.linear(x2, dict(t), spec, N, K)
    return torch.cat([fmt.linear(x2, _row_slice(t, N, n0, min(N, n0 + rows)), spec, min(N, n0 + rows) - n0, K)
                      for n0 in range(0, N, rows)], dim=-1)


@functools.lru_cache(maxsize=None)
def int4_supported() -> bool:
    """Whether torch's CPU int4 kernel exists and reproduces exa's int4 weights exactly (fp32)."""
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return False
    from runtime.quant import intq
    N, K, spec = 80, 64, QuantSpec("int", 4, 32, zero_mode="int")
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0))
    t = intq.quantize(w, spec)
    try:
        gs = _int4_group(spec, K)
        tiles = torch.cat([_torch_pack(t["qweight"][i:i + 64], K) for i in (0, 64)])  # tiles independent
        weight = _int4_weight(t["qweight"], K)                    # the direct packing, if the layout is known
        prep = Prepared("int4", weight, _int4_scales(spec, t, K, gs, torch.float32), gs, torch.float32)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K), prep.weight, gs, prep.scales)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.equal(tiles, weight) and torch.equal(got.t(), intq.dequantize(t, spec, N, K)))
