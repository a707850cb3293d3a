"""bitsandbytes checkpoints serialized by transformers -> exa's ``nf4`` / ``fp4`` / ``int8``, exactly.

4-bit (``load_in_4bit``), per quantized linear ``W [N, K]`` (``owner.weight`` + quant state):

* ``weight`` uint8 ``[N*K/2, 1]``: W flattened row-major, two 4-bit codes per byte, the first
  value in the high nibble; blocks of ``blocksize`` consecutive values share one absmax.
* ``weight.quant_map`` float32 ``[16]``: the value of every code (NF4 or FP4 table).
* ``weight.absmax``: float32 ``[B]``, or with double quantization (nested) uint8 ``[B]`` codes
  over ``weight.nested_quant_map`` (float32 ``[256]``, the dynamic map) with one
  ``weight.nested_absmax`` float32 per 256 blocks and a scalar ``nested_offset`` added back.
* ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object with
  quant_type, blocksize, shape ``[N, K]``, dtype, nested_blocksize, nested_offset, ...
* ``W = quant_map[q] * absmax[block]``, ``absmax = nested_map[a] * nested_absmax[i // 256] + offset``.

exa's nf4/fp4 layout is bitsandbytes' own (``runtime.quant.bnb4``), so bytes are copied as they
are; the code tables are checked value by value against exa's (a differently ordered table is
remapped code by code, a table with other values raises). Blocks must not straddle rows
(``K % blocksize == 0``) and the nested block must be 256.

8-bit (``load_in_8bit``): ``weight`` int8 ``[N, K]`` and ``SCB`` float32 ``[N]`` (row absmax)
-> exa ``int8`` with ``qweight`` = the codes and ``scales = SCB / 127`` (fp32). bitsandbytes
dequantizes as ``(q * SCB) * (1/127)``; exa computes ``q * (SCB / 127)``: the codes and scales
are exact, the dequantized values agree to within one float32 rounding (relative 2**-23).
"""
from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import Tensor

from runtime.quant.bnb4 import DQ_BLOCK, code_table, dynamic_map
from runtime.quant.spec import QuantSpec

__all__ = ["convert", "detect", "model_spec", "owners", "roles"]

_STATE = "weight.quant_state.bitsandbytes__"
ROLES4 = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


def detect(qcfg: dict) -> bool:
    """True for a transformers ``quantization_config`` of bitsandbytes (4- or 8-bit)."""
    return str(qcfg.get("quant_method", "")).lower() == "bitsandbytes"


def _is4(qcfg: dict) -> bool:
    if qcfg.get("load_in_4bit"):
        return True
    if qcfg.get("load_in_8bit"):
        return False
    raise ValueError("bitsandbytes quantization_config has neither load_in_4bit nor load_in_8bit")


def _state(t: Tensor, name: str) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: the bitsandbytes quant_state is not valid JSON: {e}") from e


def model_spec(qcfg: dict, sample: Callable[[str], Tensor] | None = None) -> QuantSpec:
    """The exa spec; 4-bit reads blocksize / nesting from ``sample(role)`` (the first linear)."""
    if not _is4(qcfg):
        return QuantSpec("int8", 8, -1, threshold=float(qcfg.get("llm_int8_threshold", 6.0)))
    qt = str(qcfg.get("bnb_4bit_quant_type", "fp4")).lower()
    if qt not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes 4-bit quant_type {qt!r} is not supported (nf4, fp4)")
    block, nested = 64, bool(qcfg.get("bnb_4bit_use_double_quant", False))
    if sample is not None:
        st = _state(sample("quant_state"), "quant_state")
        qt, block, nested = st.get("quant_type", qt), int(st.get("blocksize", 64)), "nested_offset" in st
    return QuantSpec(qt, 4, block, double_quant=nested)


def owners(keys: set[str]) -> list[str]:
    """Module names of the quantized linears (a quant state for 4-bit, an SCB for 8-bit)."""
    out = {k.split("." + _STATE)[0] for k in keys if "." + _STATE in k}
    out |= {k[: -len(".SCB")] for k in keys if k.endswith(".SCB")}
    return sorted(out)


def roles(owner: str, keys: set[str]) -> dict[str, str]:
    r = {role: f"{owner}.{role}" for role in ROLES4 + ("SCB", "weight_format") if f"{owner}.{role}" in keys}
    st = [k for k in keys if k.startswith(f"{owner}.{_STATE}")]
    if st:
        r["quant_state"] = st[0]
    return r


def _remap(src: Tensor, exa: Tensor, what: str) -> Tensor | None:
    """None when ``src`` equals exa's table; else src code -> exa code (same values, reordered)."""
    src = src.float().reshape(-1)
    if src.shape == exa.shape and torch.equal(src, exa):
        return None
    hit = src.unsqueeze(1) == exa.unsqueeze(0)                           # [n, n]
    if src.shape != exa.shape or not bool(hit.any(1).all()):
        raise ValueError(f"{what} holds values exa's table does not have: cannot import it exactly")
    return hit.float().argmax(1).to(torch.uint8)


def convert(t: dict[str, Tensor], qcfg: dict, name: str = "linear") -> tuple[QuantSpec, dict[str, Tensor]]:
    """One bitsandbytes linear's tensors (by role) -> (spec, exa packed tensors)."""
    if not _is4(qcfg):
        q, scb = t["weight"], t["SCB"]
        if q.dtype != torch.int8 or q.dim() != 2 or tuple(scb.shape) != (q.shape[0],):
            raise ValueError(f"{name}: expected weight int8 [N, K] and SCB [N], got "
                             f"{q.dtype} {list(q.shape)} and {list(scb.shape)}")
        return model_spec(qcfg), {"qweight": q.contiguous(), "scales": scb.float() / 127.0}
    st = _state(t["quant_state"], f"{name}.quant_state")
    spec = model_spec(qcfg, lambda role: t[role])
    N, K = (int(v) for v in st["shape"])
    if K % spec.group_size:
        raise ValueError(f"{name}: blocksize {spec.group_size} straddles rows (in_features {K}); "
                         "exa's nf4/fp4 blocks must not")
    qw = t["weight"].reshape(-1)
    if qw.dtype != torch.uint8 or qw.numel() != N * K // 2:
        raise ValueError(f"{name}.weight: expected uint8 with {N * K // 2} bytes, got {qw.dtype} {qw.numel()}")
    remap = _remap(t["weight.quant_map"], code_table(spec.fmt), f"{name}.weight.quant_map")
    if remap is not None:
        hi, lo = remap[(qw >> 4).long()], remap[(qw & 15).long()]
        qw = (hi << 4) | lo
    out = {"qweight": qw.contiguous()}
    B = N * K // spec.group_size
    a = t["weight.absmax"].reshape(-1)
    if a.numel() != B:
        raise ValueError(f"{name}.weight.absmax: expected {B} blocks, got {a.numel()}")
    if not spec.double_quant:
        out["absmax"] = a.float()
        return spec, out
    if int(st.get("nested_blocksize", DQ_BLOCK)) != DQ_BLOCK:
        raise ValueError(f"{name}: nested_blocksize {st.get('nested_blocksize')} is not {DQ_BLOCK}")
    remap2 = _remap(t["weight.nested_quant_map"], dynamic_map(), f"{name}.weight.nested_quant_map")
    a = a.to(torch.uint8) if remap2 is None else remap2[a.long()]
    out.update(absmax_q=a.contiguous(), absmax2=t["weight.nested_absmax"].float().reshape(-1).contiguous(),
               offset=torch.tensor([float(st["nested_offset"])], dtype=torch.float32))
    return spec, out
