"""Dequant + GEMM for prefill (M >= 17) with nf4 / fp4 weights (bitsandbytes layout).

Same tiling as ``int_gemm`` (grouped program order, pipelined x tiles, SPLIT_K, SWAP between
``x @ W.T`` and ``(W @ x.T).T``); the weight tile comes from ``nf4_tile`` (a 256-entry table of
value pairs per byte, times the block's absmax, double quantization decoded in the kernel).
From M bucket DEQUANT_MIN_M the tuner also times dequantize + cuBLAS (``dequant.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.common import check_nf4_inputs, group_of
from runtime.kernels.int_gemm import DEQUANT_MIN_M, store_tile, tile_ids
from runtime.kernels.nf4_gemv import absmax_args, lut
from runtime.kernels.tl_dequant import dot_acc, nf4_absmax, nf4_tile
from runtime.kernels.dequant import dequant_candidates, dequant_matmul
from runtime.kernels.splitk import partials, sum_partials
from runtime.kernels.tuning import Tuner, interpreting, m_bucket
from runtime.quant.spec import QuantSpec

TUNER = Tuner("nf4_gemm")


@triton.jit
def _nf4_gemm_kernel(x_ptr, qw_ptr, a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, lut_ptr, out_ptr,
                     M, N, K, G, stride_xm, stride_om, GROUP: tl.constexpr, DQ: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr,
                     SPLIT_K: tl.constexpr = 1):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    NSUB: tl.constexpr = BLOCK_K // SUBK
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_n % N
    xm = offs_m % M
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_len = K // SPLIT_K
    for k0 in range(tl.program_id(1) * k_len, (tl.program_id(1) + 1) * k_len, BLOCK_K):
        for sub in tl.static_range(NSUB):
            ks = k0 + sub * SUBK
            A = nf4_absmax(a_ptr, aq_ptr, a2_ptr, dmap_ptr, off_ptr, rows, ks // GROUP, G, DQ).to(DT)
            kw0 = tl.multiple_of(ks // 8, SUBK // 8)
            w = nf4_tile(qw_ptr, lut_ptr, rows, kw0, K // 8, A, DT, BLOCK_N, SUBK, INTERP)
            offs_k = ks + tl.arange(0, SUBK)
            if SWAP:
                xt = tl.load(x_ptr + xm[None, :] * stride_xm + offs_k[:, None])   # [SUBK, BM]
                acc = dot_acc(w, xt, acc, INTERP)
            else:
                xa = tl.load(x_ptr + xm[:, None] * stride_xm + offs_k[None, :])   # [BM, SUBK]
                acc = dot_acc(xa, tl.trans(w), acc, INTERP)
    store_tile(out_ptr + tl.program_id(1) * M * stride_om, acc, offs_m, offs_n, M, N, stride_om,
               SWAP)


def _cfg(bm, bn, bk, swap=False, nw=8, ns=3, gm=8, sk=1):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap, "GROUP_M": gm,
            "num_warps": nw, "num_stages": ns, "SPLIT_K": sk}


def candidates(M: int) -> list[dict]:
    """Default configs for the M bucket (a short list: each is compiled and timed once).

    Only the swapped orientation (W tile as the A operand): with triton 3.6 on sm_90 the other
    one fails to compile ("Illegal shared layout" in TritonGPUOptimizeDotOperands)."""
    if M <= 64:
        return [_cfg(32, 128, 64, True, 4, 3), _cfg(64, 128, 64, True, 4, 3),
                _cfg(64, 64, 64, True, 4, 4), _cfg(32, 64, 128, True, 4, 3)]
    return [_cfg(128, 128, 64, True, 8, 3), _cfg(256, 128, 64, True, 8, 3),
            _cfg(128, 64, 64, True, 4, 4), _cfg(256, 64, 64, True, 8, 4),
            _cfg(128, 256, 64, True, 8, 3), _cfg(256, 128, 64, True, 8, 4, gm=16),
            _cfg(256, 64, 64, True, 8, 4, sk=2), _cfg(128, 64, 64, True, 4, 4, sk=4)] \
        + (dequant_candidates() if M >= DEQUANT_MIN_M else [])


def _valid(cfg: dict, K: int, group: int) -> bool:
    if cfg.get("DEQUANT"):
        return True
    bk = cfg["BLOCK_K"]
    subk = min(bk, group)
    return not (K % (bk * cfg.get("SPLIT_K", 1)) or group % subk or bk % subk or subk < 16)


def launch(x, t, spec, N, K, cfg, out=None):
    """Run one config. x [M, K]; returns out [M, N] in x.dtype."""
    if cfg.get("DEQUANT"):
        return dequant_matmul(x, t, spec, N, K, cfg, out)
    M = x.shape[0]
    a, aq, a2, dm, off = absmax_args(t, spec, N, K, x.device)
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    sk = cfg.get("SPLIT_K", 1)
    dst = partials(out, sk)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), sk)
    _nf4_gemm_kernel[grid](
        x, t["qweight"].view(torch.int32), a, aq, a2, dm, off, lut(spec.fmt, x.dtype, x.device),
        dst, M, N, K, K // group_of(spec, K), x.stride(0), dst.stride(-2), GROUP=group_of(spec, K),
        DQ=spec.double_quant, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], SWAP=cfg["SWAP"], INTERP=interpreting(),
        SPLIT_K=sk, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sum_partials(dst, out)               # partial sums added in a fixed order
    return out


def nf4_gemm(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int, out=None) -> torch.Tensor:
    """Prefill GEMM with nf4/fp4 weights: x [M, K] -> [M, N] in x.dtype."""
    check_nf4_inputs(x, t, spec, N, K)
    M = x.shape[0]
    assert M >= 1, "empty input"
    mb = m_bucket(M)
    g = group_of(spec, K)
    key = (N, K, mb, spec.fmt, g, spec.double_quant, x.dtype)
    cfg = TUNER.pick(key, lambda: candidates(mb), lambda c: _valid(c, K, g),
                     lambda c: launch(x, t, spec, N, K, c, out), x.is_cuda)
    return launch(x, t, spec, N, K, cfg, out)
