"""AWQ checkpoints (AutoAWQ "gemm" packing, transformers "awq") -> exa's ``int`` format, exactly.

Source layout, per quantized linear ``W [N, K]``, 4 bits, group size ``g``, ``G = K / g``:

* ``qweight`` int32 ``[K, N/8]``: each word holds 8 output columns of one input row. The
  columns are interleaved: nibble ``i`` (bits ``4i .. 4i+3``) of word ``j`` holds column
  ``8j + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]``.
* ``qzeros`` int32 ``[G, N/8]``: zero points, packed the same way.
* ``scales`` float16 ``[G, N]``; optional ``bias``.
* ``W[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])`` (asymmetric, zero_point=True).

Mapping to exa: ``int`` 4-bit, same group size, zero_mode "int": codes transposed to
``[N, K]`` and repacked, ``scales`` and ``zeros`` (uint8) transposed to ``[N, G]``. Every value
is carried over unchanged, so exa's ``(q - z) * s`` is bit-identical to AWQ's.
Only the "gemm" packing is read; "gemv" / "gemv_fast" / "marlin" / "exllama" versions and
zero_point=False raise ValueError.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime.importers._bits import check_int32, unpack_int32
from runtime.quant.intq import pack_codes
from runtime.quant.spec import QuantSpec

__all__ = ["ORDER", "convert", "detect", "model_spec", "owners", "roles"]

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)             # nibble i of a word holds column ORDER[i]
ROLES = ("qweight", "qzeros", "scales")


def detect(qcfg: dict) -> bool:
    """True for a transformers ``quantization_config`` of AWQ."""
    return str(qcfg.get("quant_method", "")).lower() == "awq"


def model_spec(qcfg: dict, sample=None) -> QuantSpec:
    """The exa spec of every quantized linear: int4, the checkpoint's group size, zeros "int"."""
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (only the 'gemm' packing)")
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"AWQ bits={bits} is not supported (4 only)")
    if not bool(qcfg.get("zero_point", True)):
        raise ValueError("AWQ with zero_point=False is not supported")
    return QuantSpec("int", 4, int(qcfg.get("group_size", qcfg.get("q_group_size", 128))),
                     sym=False, zero_mode="int")


def owners(keys: set[str]) -> list[str]:
    """Module names of the quantized linears (those with qweight, qzeros and scales)."""
    return sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight")
                  and k[: -len("qweight")] + "qzeros" in keys and k[: -len("qweight")] + "scales" in keys)


def roles(owner: str, keys: set[str]) -> dict[str, str]:
    return {r: f"{owner}.{r}" for r in ROLES}


def _columns(words: Tensor) -> Tensor:
    """``[R, N/8]`` int32 in AWQ's interleaved order -> ``[R, N]`` int32 codes in column order."""
    nib = unpack_int32(words, 4, 1).reshape(words.shape[0], -1, 8)     # [R, N/8, 8] by nibble
    inv = torch.tensor([ORDER.index(c) for c in range(8)])              # column c sits in nibble inv[c]
    return nib.index_select(2, inv).reshape(words.shape[0], -1)


def convert(t: dict[str, Tensor], qcfg: dict, name: str = "linear") -> tuple[QuantSpec, dict[str, Tensor]]:
    """One AWQ linear's tensors (by role) -> (spec, exa packed tensors)."""
    spec = model_spec(qcfg)
    qw = t["qweight"]
    if qw.dim() != 2:
        raise ValueError(f"{name}.qweight: expected int32 [K, N/8], got {list(qw.shape)}")
    K, N = qw.shape[0], qw.shape[1] * 8
    g = spec.group_size if spec.group_size != -1 else K
    if K % g:
        raise ValueError(f"{name}: in_features {K} is not a multiple of group_size {g}")
    G = K // g
    check_int32(qw, f"{name}.qweight", (K, N // 8))
    check_int32(t["qzeros"], f"{name}.qzeros", (G, N // 8))
    s = t["scales"]
    if s.dtype != torch.float16 or tuple(s.shape) != (G, N):
        raise ValueError(f"{name}.scales: expected float16 [{G}, {N}], got {s.dtype} {list(s.shape)}")
    q = _columns(qw)                                                    # [K, N]
    z = _columns(t["qzeros"])                                           # [G, N]
    return spec, {"qweight": pack_codes(q.t().to(torch.uint8).contiguous(), 4),
                  "scales": s.t().contiguous(), "zeros": z.t().to(torch.uint8).contiguous()}
