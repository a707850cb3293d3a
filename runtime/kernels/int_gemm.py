"""Dequant + GEMM for prefill: ``out [M, N] = x [M, K] @ W.T`` with W in the ``int`` format, M >= 17.

Compute-bound: each program dequantizes a [BLOCK_N, BLOCK_K] weight tile in registers
(``tl_dequant.int_tile``, natural K order) and feeds it to the tensor cores with a pipelined x
tile; the dequant is amortized over BLOCK_M rows of x. Two orientations are tuned between:

* SWAP False: ``acc [BM, BN] += x [BM, BK] @ W.T`` (W staged through shared memory);
* SWAP True:  ``acc [BN, BM] += W [BN, BK] @ x.T`` (W straight from registers as the A operand).

Programs are ordered in groups of GROUP_M row tiles so that concurrently running programs share
weight tiles in L2. SPLIT_K > 1 (for long K and few tiles: more programs per SM) writes
float32 partial sums, added afterwards in a fixed order (deterministic). From M bucket
DEQUANT_MIN_M the tuner also times dequantize + cuBLAS (``dequant.py``) and keeps whichever is
faster. On an sm_90 GPU, for M buckets GLUON_M, it also times the wgmma kernel of
``int_gemm_gluon.py`` (4-bit int weights with uint8 zeros, bf16/fp16 x; ``EXA_GEMM_GLUON=0``
turns it off), kept only if its output matches a Triton config's on the same inputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from runtime.kernels.common import check_int_inputs, group_of, mode_of
from runtime.kernels.tl_dequant import dot_acc, int_group_params, int_tile
from runtime.kernels.dequant import dequant_candidates, dequant_matmul
from runtime.kernels.splitk import partials, sum_partials
from runtime.kernels.tuning import Tuner, agrees_with, interpreting, m_bucket
from runtime.quant.spec import QuantSpec

TUNER = Tuner("int_gemm")
DEQUANT_MIN_M = 128       # M buckets from here also time dequantize + cuBLAS (dequant.py)
GLUON_M = (64, 512)       # M buckets that also time the wgmma kernel (int_gemm_gluon.py)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, grouped GROUP_M row tiles at a time (L2 reuse)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _int_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, stride_xm, stride_om,
                     stride_qw, BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SWAP: tl.constexpr, INTERP: tl.constexpr,
                     SPLIT_K: tl.constexpr = 1):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP
    NSUB: tl.constexpr = BLOCK_K // SUBK
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_n % N                                              # clamped for loads
    xm = offs_m % M
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_len = K // SPLIT_K
    for k0 in range(tl.program_id(1) * k_len, (tl.program_id(1) + 1) * k_len, BLOCK_K):
        for sub in tl.static_range(NSUB):
            ks = k0 + sub * SUBK
            Z, S, MN = int_group_params(s_ptr, z_ptr, rows, ks // GROUP, G, BITS, MODE, DT)
            kw0 = tl.multiple_of(ks // CPW, SUBK // CPW)
            w = int_tile(qw_ptr, rows, kw0, stride_qw, K, Z, S, MN, BITS, MODE, DT, False,
                         BLOCK_N, SUBK, INTERP)                     # [BN, SUBK]
            offs_k = ks + tl.arange(0, SUBK)
            if SWAP:
                xt = tl.load(x_ptr + xm[None, :] * stride_xm + offs_k[:, None])   # [SUBK, BM]
                acc = dot_acc(w, xt, acc, INTERP)
            else:
                xa = tl.load(x_ptr + xm[:, None] * stride_xm + offs_k[None, :])   # [BM, SUBK]
                acc = dot_acc(xa, tl.trans(w), acc, INTERP)
    store_tile(out_ptr + tl.program_id(1) * M * stride_om, acc, offs_m, offs_n, M, N, stride_om,
               SWAP)


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, SWAP: tl.constexpr):
    """Store acc ([BN, BM] if SWAP else [BM, BN]) to rows offs_m, columns offs_n of out."""
    if SWAP:
        o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    else:
        o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        o_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _cfg(bm, bn, bk, swap=False, nw=8, ns=3, gm=8, sk=1):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SWAP": swap, "GROUP_M": gm,
            "num_warps": nw, "num_stages": ns, "SPLIT_K": sk}


def candidates(M: int, bits: int, gluon: bool = False) -> list[dict]:
    """Default configs for the M bucket (a short list: each is compiled and timed once); with
    ``gluon`` (``gluon_on``), the wgmma kernel's tuned configs too in the GLUON_M buckets."""
    extra = ([{**c, "GLUON": True} for c in _gluon().TUNED]
             if gluon and bits == 4 and GLUON_M[0] <= M <= GLUON_M[1] else [])
    if M <= 64:
        return [_cfg(32, 128, 64, True, 4, 3), _cfg(64, 128, 64, True, 4, 3),
                _cfg(64, 64, 128, True, 4, 3), _cfg(32, 64, 128, True, 4, 4),
                _cfg(64, 128, 64, False, 4, 3)] + extra
    return [_cfg(128, 128, 64, False, 8, 3), _cfg(128, 128, 64, True, 8, 3),
            _cfg(256, 128, 64, True, 8, 3), _cfg(128, 128, 128, False, 8, 2),
            _cfg(128, 64, 64, True, 4, 4), _cfg(256, 128, 64, True, 8, 4, gm=16),
            _cfg(128, 256, 64, True, 8, 3), _cfg(128, 64, 64, True, 4, 4, sk=2),
            _cfg(128, 64, 64, True, 4, 4, sk=4), _cfg(256, 128, 64, True, 8, 4, sk=2),
            _cfg(128, 128, 128, False, 8, 2, sk=2)] \
        + (dequant_candidates() if M >= DEQUANT_MIN_M else []) + extra


def _gluon():
    """The wgmma kernel's module, imported only when asked for (it costs start-up time)."""
    from runtime.kernels import int_gemm_gluon
    return int_gemm_gluon


def gluon_on(x: torch.Tensor, var: str = "EXA_GEMM_GLUON", default: str = "1") -> bool:
    """Whether a tuner is offered the wgmma kernel for x: a CUDA tensor on an sm_90 GPU, bf16
    or fp16, triton with Gluon, and the environment variable ``var`` (default ``default``) not
    0 (int_gemv asks with its own variable)."""
    return (os.environ.get(var, default) != "0" and x.is_cuda and not interpreting()
            and x.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(x.device) == (9, 0) and _gluon().HAVE_GLUON)


def _valid(cfg: dict, N: int, K: int, bits: int, group: int, M: int = 0, spec=None) -> bool:
    if cfg.get("GLUON"):
        return spec is not None and _gluon().valid(cfg, M, N, K, spec)
    if cfg.get("DEQUANT"):
        return True                      # every shape dispatch.supported admits
    cpw = 16 if bits == 3 else 32 // bits
    bk = cfg["BLOCK_K"]
    subk = min(bk, group)
    if not cfg["SWAP"] and not interpreting() and (bits in (2, 3) or subk < 64):
        return False     # triton 3.6 / sm_90 fails to compile these ("Illegal shared layout")
    return not (K % (bk * cfg.get("SPLIT_K", 1)) or subk % cpw or group % subk or bk % subk
                or subk < 16)


def launch(x, t, spec, N, K, cfg, out=None):
    """Run one config. x [M, K]; returns out [M, N] in x.dtype."""
    if cfg.get("DEQUANT"):
        return dequant_matmul(x, t, spec, N, K, cfg, out)
    if cfg.get("GLUON"):
        return _gluon().launch(x, t, spec, N, K, cfg, out)
    M = x.shape[0]
    g = group_of(spec, K)
    mode = mode_of(spec)
    zt = t["scales"] if mode == 0 else t["zeros" if mode == 1 else "mins"]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    sk = cfg.get("SPLIT_K", 1)
    dst = partials(out, sk)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), sk)
    _int_gemm_kernel[grid](
        x, t["qweight"].view(torch.int32), t["scales"], zt, dst, M, N, K, K // g, x.stride(0),
        dst.stride(-2), K * spec.bits // 32, BITS=spec.bits, GROUP=g, MODE=mode,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], SWAP=cfg["SWAP"], INTERP=interpreting(), SPLIT_K=sk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    sum_partials(dst, out)               # partial sums added in a fixed order
    return out


def int_gemm(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int, out=None) -> torch.Tensor:
    """Prefill GEMM: x [M, K] -> [M, N] in x.dtype. Autotuned per (N, K, M bucket)."""
    check_int_inputs(x, t, spec, N, K)
    M = x.shape[0]
    assert M >= 1, "empty input"
    g = group_of(spec, K)
    mb = m_bucket(M)
    key = (N, K, mb, spec.bits, g, mode_of(spec), x.dtype)
    cands = lambda: candidates(mb, spec.bits, gluon_on(x))   # noqa: E731 - on a tuner miss only

    def base():                          # the Triton config a GLUON one must agree with
        return next((c for c in cands() if not c.get("GLUON") and not c.get("DEQUANT")
                     and _valid(c, N, K, spec.bits, g)), None)
    run = lambda c: launch(x, t, spec, N, K, c, out)   # noqa: E731
    cfg = TUNER.pick(key, cands, lambda c: _valid(c, N, K, spec.bits, g, M, spec), run, x.is_cuda,
                     check=agrees_with(base, lambda c: bool(c.get("GLUON")), run))
    return launch(x, t, spec, N, K, cfg, out)
