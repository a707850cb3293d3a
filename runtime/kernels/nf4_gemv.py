"""Fused dequant + GEMV for decode with nf4 / fp4 weights (bitsandbytes layout), M = 1..16.

Same scheme as ``int_gemv``: ``acc [BN, 16] += W tile [BN, BK] @ x.T tile [BK, 16]`` on the tensor
cores, every weight byte read once as part of an int32 word. A byte holds two codes; it is looked
up whole in a 256-entry table of value pairs (``nf4_tile``) and scaled by its block's absmax.
Double-quantized absmax (uint8 codes over the dynamic map, float32 absmax2 per 256 blocks, an
offset) is decoded in the kernel, per row and block, from the packed tensors directly.

At M <= 4 the CUDA-core kernel of ``nf4_gemv_simt`` (a 16-entry lookup per code by warp shuffle,
no dequantized tile) joins the candidates (configs marked ``SIMT``); the tuner times both.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.common import check_nf4_inputs, group_of
from runtime.kernels.nf4_gemv_simt import simt_candidates, simt_gemv, simt_valid
from runtime.kernels.reference import code_table, dynamic_map
from runtime.kernels.tl_dequant import dot_acc, load_xt, nf4_absmax, nf4_tile
from runtime.kernels.splitk import partials, sum_partials
from runtime.kernels.tuning import Tuner, interpreting, m_bucket
from runtime.quant.spec import QuantSpec

TUNER = Tuner("nf4_gemv")
_TABLES: dict[tuple, torch.Tensor] = {}


def lut(fmt: str, dtype: torch.dtype, device) -> torch.Tensor:
    """Byte -> code-value table for ``nf4_tile`` (cached per format, dtype and device)."""
    key = (fmt, dtype, str(device))
    if key not in _TABLES:
        code = code_table(fmt)
        b = torch.arange(256)
        first, second = code[b >> 4], code[b & 15]          # high nibble first in K order
        if dtype == torch.float32:
            tab = torch.cat([first, second])
        else:
            lo = first.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
            hi = second.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
            tab = (lo | (hi << 16)).to(torch.int32)
        _TABLES[key] = tab.to(device)
    return _TABLES[key]


def codes(fmt: str, device) -> torch.Tensor:
    """The 16 float32 code values (for ``nf4_gemv_simt`` in the CPU interpreter)."""
    key = (fmt, "codes", str(device))
    if key not in _TABLES:
        _TABLES[key] = code_table(fmt).to(device)
    return _TABLES[key]


def dmap(device) -> torch.Tensor:
    key = ("dynamic", str(device))
    if key not in _TABLES:
        _TABLES[key] = dynamic_map().to(device)
    return _TABLES[key]


def absmax_args(t, spec: QuantSpec, N: int, K: int, device):
    """(a, aq, a2, dmap, offset) pointers for ``nf4_absmax``; unused ones alias a real tensor."""
    if spec.double_quant:
        a2 = t["absmax2"]
        return a2, t["absmax_q"], a2, dmap(device), t["offset"]
    a = t["absmax"]
    return a, a, a, a, a


@triton.jit
def _nf4_gemv_kernel(x_ptr, qw_ptr, a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, lut_ptr, out_ptr,
                     M, N, K, G, stride_xm, stride_om, GROUP: tl.constexpr, DQ: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     SPLIT_K: tl.constexpr, INTERP: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    NSUB: tl.constexpr = BLOCK_K // SUBK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N
    k_len = K // SPLIT_K
    k_lo = pid_k * k_len
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_len, BLOCK_K):
        for sub in tl.static_range(NSUB):
            ks = k0 + sub * SUBK
            A = nf4_absmax(a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, rows, ks // GROUP, G, DQ).to(DT)
            kw0 = tl.multiple_of(ks // 8, SUBK // 8)
            w = nf4_tile(qw_ptr, lut_ptr, rows, kw0, K // 8, A, DT, BLOCK_N, SUBK, INTERP)
            xt = load_xt(x_ptr, ks, M, stride_xm, SUBK, BLOCK_M, 8, False)   # [SUBK, BM]
            acc = dot_acc(w, xt, acc, INTERP)
    offs_m = tl.arange(0, BLOCK_M)
    # SPLIT_K > 1: partial sums go to slice pid_k of a [SPLIT_K, M, N] float32 buffer, summed
    # afterwards in a fixed order (atomics would make results vary from run to run)
    o_ptrs = out_ptr + pid_k * M * stride_om + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _cfg(bn, bk, sk=1, nw=4, ns=1, bm=16):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk, "num_warps": nw,
            "num_stages": ns}


def candidates(M: int) -> list[dict]:
    """Default configs (a short list: each is compiled and timed once per key)."""
    return [_cfg(64, 256), _cfg(32, 256), _cfg(64, 256, sk=2), _cfg(64, 256, sk=4),
            _cfg(32, 256, sk=4), _cfg(64, 256, sk=8), _cfg(32, 128, sk=8), _cfg(64, 64)] \
        + simt_candidates(M)


def _valid(cfg: dict, M: int, K: int, group: int) -> bool:
    if cfg.get("SIMT"):
        return simt_valid(cfg, M, K, group)
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    subk = min(bk, group)
    return not (K % (bk * sk) or group % subk or bk % subk or subk < 16 or cfg["BLOCK_M"] < M)


def launch(x, t, spec, N, K, cfg, out=None):
    """Run one config. x [M, K]; returns out [M, N] in x.dtype."""
    M = x.shape[0]
    absmax = absmax_args(t, spec, N, K, x.device)
    sk = cfg["SPLIT_K"]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    g = group_of(spec, K)
    qw = t["qweight"].view(torch.int32)
    if cfg.get("SIMT"):
        return simt_gemv(x, qw, absmax, codes(spec.fmt, x.device), out, N, K, g, spec.fmt,
                         spec.double_quant, interpreting(), cfg)
    dst = partials(out, sk)
    _nf4_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), sk)](
        x, qw, *absmax, lut(spec.fmt, x.dtype, x.device), dst, M, N, K, K // g, x.stride(0),
        dst.stride(-2), GROUP=g, DQ=spec.double_quant, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"], SPLIT_K=sk, INTERP=interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sum_partials(dst, out)               # partial sums added in a fixed order
    return out


def nf4_gemv(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int, out=None) -> torch.Tensor:
    """Decode GEMV with nf4/fp4 weights: x [M, K] (M <= 16) -> [M, N] in x.dtype."""
    check_nf4_inputs(x, t, spec, N, K)
    M = x.shape[0]
    assert 1 <= M <= 16, f"nf4_gemv handles M = 1..16, got {M}"
    mb = m_bucket(M)
    g = group_of(spec, K)
    key = (N, K, mb, spec.fmt, g, spec.double_quant, x.dtype)
    cfg = TUNER.pick(key, lambda: candidates(mb), lambda c: _valid(c, mb, K, g),
                     lambda c: launch(x, t, spec, N, K, c, out), x.is_cuda)
    return launch(x, t, spec, N, K, cfg, out)
