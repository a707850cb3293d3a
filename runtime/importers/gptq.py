"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers "gptq") -> exa's ``int`` format, exactly.

Source layout, per quantized linear ``W [N, K]`` (K = in_features, N = out_features), with
``b`` = bits (2, 3, 4, 8), ``g`` = group_size (-1: one group of K), ``G = ceil(K / g)``:

* ``qweight`` int32 ``[K*b/32, N]``: codes packed along K; every column is one little-endian
  bit stream (code k at stream bits ``[b*k, b*k+b)``), so for 2/4/8 bits word ``i`` holds codes
  ``k = i*32/b + j`` at bit ``b*j``; for 3 bits every 3 words hold 32 codes, two of which
  straddle a word boundary (same stream rule).
* ``qzeros`` int32 ``[G, N*b/32]``: zero points packed along N, same stream rule per row.
* ``scales`` float16 ``[G, N]``; optional ``g_idx`` int32 ``[K]`` (group of input column k);
  optional ``bias``.
* ``W[n, k] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``.

Zero-point convention. AutoGPTQ's original format (``checkpoint_format`` "gptq", the default,
"v1") stores ``z - 1`` and its kernels add the 1 back when reading (without wrapping, so a
stored all-ones field reads as ``2**b``); GPTQModel's "gptq_v2" stores ``z`` itself. Both are
read here as the kernels read them: ``z = stored + 1`` for v1, ``z = stored`` for v2. (A true
zero point of 0 cannot be stored in v1: AutoGPTQ's packer writes ``-1`` into the neighbouring
fields too; such files are broken at the source.)

Mapping to exa (``runtime.quant.spec``): ``int`` format, same bits and group size, codes
transposed to ``[N, K]`` and repacked; ``scales`` and ``zeros`` transposed to ``[N, G]``
(``zeros`` uint8, zero_mode "int"); ``sym`` (from the config) drops ``zeros`` after checking that
every zero point is ``2**(b-1)``. Every value is carried over unchanged: the exa weight
``(q - z) * s`` is bit-identical to GPTQ's.

Act-order (``desc_act``): when ``g_idx`` is not the trivial ``k // g`` the groups are scattered
over K. exa keeps groups contiguous, so the columns are reordered by group (a stable sort of
``g_idx``) and the order is stored as ``perm`` (spec ``act_order``); QuantLinear gathers
``x[..., perm]`` first. Exact: each group must then hold exactly ``g`` consecutive columns,
which GPTQ's act-order always produces; anything else raises ValueError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime.importers._bits import check_int32, unpack_int32
from runtime.quant.intq import pack_codes
from runtime.quant.spec import QuantSpec

__all__ = ["convert", "detect", "model_spec", "owners", "roles"]

ROLES = ("qweight", "qzeros", "scales", "g_idx")


def detect(qcfg: dict) -> bool:
    """True for a transformers ``quantization_config`` (or quantize_config.json) of GPTQ."""
    return str(qcfg.get("quant_method", "")).lower() == "gptq"


def _version(qcfg: dict) -> int:
    fmt = str(qcfg.get("checkpoint_format", "gptq") or "gptq").lower()
    if fmt == "gptq":
        return 1
    if fmt == "gptq_v2":
        return 2
    raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2'; "
                     "marlin/bitblas repackings use another layout)")


def model_spec(qcfg: dict, sample=None) -> QuantSpec:
    """The exa spec every quantized linear of this checkpoint converts to."""
    _version(qcfg)
    bits, g = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"GPTQ bits={bits} is not supported (2, 3, 4 or 8)")
    return QuantSpec("int", bits, g, sym=bool(qcfg.get("sym", True)), zero_mode="int",
                     act_order=bool(qcfg.get("desc_act", False)))


def owners(keys: set[str]) -> list[str]:
    """Module names of the quantized linears (those with qweight, qzeros and scales)."""
    return sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight")
                  and k[: -len("qweight")] + "qzeros" in keys and k[: -len("qweight")] + "scales" in keys)


def roles(owner: str, keys: set[str]) -> dict[str, str]:
    """{role: checkpoint key} of one quantized linear (g_idx only when stored)."""
    return {r: f"{owner}.{r}" for r in ROLES if f"{owner}.{r}" in keys}


def convert(t: dict[str, Tensor], qcfg: dict, name: str = "linear") -> tuple[QuantSpec, dict[str, Tensor]]:
    """One GPTQ linear's tensors (by role) -> (spec, exa packed tensors, + ``perm`` if act_order)."""
    spec = model_spec(qcfg)
    b = spec.bits
    qw = t["qweight"]
    if qw.dim() != 2 or (qw.shape[0] * 32) % b:
        raise ValueError(f"{name}.qweight: expected int32 [K*{b}/32, N], got {list(qw.shape)}")
    K, N = qw.shape[0] * 32 // b, qw.shape[1]
    g = K if spec.group_size == -1 else spec.group_size
    G = -(-K // g)
    check_int32(qw, f"{name}.qweight", (K * b // 32, N))
    if (N * b) % 32:
        raise ValueError(f"{name}: out_features {N} cannot be packed at {b} bits in int32 qzeros")
    check_int32(t["qzeros"], f"{name}.qzeros", (G, N * b // 32))
    s = t["scales"]
    if s.dtype != torch.float16 or tuple(s.shape) != (G, N):
        raise ValueError(f"{name}.scales: expected float16 [{G}, {N}], got {s.dtype} {list(s.shape)}")
    q = unpack_int32(qw, b, 0)                                    # [K, N]
    z = unpack_int32(t["qzeros"], b, 1)                           # [G, N]
    if _version(qcfg) == 1:
        z = z + 1                                                 # AutoGPTQ v1 stores z - 1
    perm = _perm(t.get("g_idx"), K, g, spec.act_order, name)
    codes = q.t()                                                 # [N, K]
    if perm is not None:
        codes = codes.index_select(1, perm.long())
    out = {"qweight": pack_codes(codes.to(torch.uint8).contiguous(), b),
           "scales": s.t().contiguous()}
    zt = z.t().contiguous()                                       # [N, G]
    if spec.sym:
        mid = 1 << (b - 1)
        if not bool((zt == mid).all()):
            raise ValueError(f"{name}: the config says sym=True but some zero points are not {mid} "
                             f"(found {sorted(set(zt.unique().tolist()))[:8]})")
    else:
        if int(zt.max()) > 255:
            raise ValueError(f"{name}: zero point {int(zt.max())} does not fit exa's uint8 zeros "
                             "(an 8-bit v1 checkpoint whose stored zero wrapped)")
        out["zeros"] = zt.to(torch.uint8)
    if spec.act_order:
        out["perm"] = (perm if perm is not None else torch.arange(K)).to(torch.int32)
    return spec, out


def _perm(g_idx: Tensor | None, K: int, g: int, act_order: bool, name: str) -> Tensor | None:
    """None when g_idx is absent or trivial; else the column order making groups contiguous."""
    trivial = torch.arange(K, dtype=torch.int64) // g
    if g_idx is None:
        return None
    gi = g_idx.to(torch.int64).reshape(-1)
    if gi.numel() != K:
        raise ValueError(f"{name}.g_idx: expected [{K}] entries, got {gi.numel()}")
    if torch.equal(gi, trivial):
        return None
    if not act_order:
        raise ValueError(f"{name}.g_idx is not k // group_size but the config has no desc_act=True")
    perm = torch.sort(gi, stable=True).indices                   # columns grouped by group index
    if not torch.equal(gi[perm], trivial):
        raise ValueError(f"{name}.g_idx: every group must hold exactly group_size={g} columns to be "
                         "stored exactly in exa's contiguous-group layout")
    return perm
