"""Fused dequant + GEMV for decode: ``out [M, N] = x [M, K] @ W.T`` with W in the ``int`` format.

M = 1..16. Memory-bound: every weight byte is read once, as wide vectors of packed int32 words,
dequantized in registers (``tl_dequant``) and multiplied on the tensor cores:
``acc [BN, 16] += W tile [BN, BK] @ x.T tile [BK, 16]`` (M padded to 16: the tensor cores have
time to spare, and the W tile is the A operand, so M = 1 costs what M = 16 does). The
weight tile comes out of the dequant in PERM order (pairs of codes packed in one register); the
x tile is permuted to match. Each program owns BLOCK_N rows and a 1/SPLIT_K slice of K;
SPLIT_K > 1 writes float32 partial sums, summed afterwards in a fixed order (deterministic).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from runtime.kernels.tl_dequant import dot_acc, int_group_params, int_tile, load_xt
from runtime.kernels.common import check_int_inputs, group_of, mode_of, packed_bytes
from runtime.kernels.int_gemv_planes import planes_candidates, planes_launch, planes_on, planes_valid
from runtime.kernels.int_gemv_simt import simt_candidates, simt_launch, simt_valid
from runtime.kernels.splitk import fused_counters, partials, sum_partials
from runtime.kernels.tuning import Tuner, agrees_with, interpreting, l2_bytes, m_bucket
from runtime.quant.spec import QuantSpec

TUNER = Tuner("int_gemv")


@triton.jit
def _int_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, M, N, K, G, stride_xm, stride_om,
                     stride_qw, BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     SPLIT_K: tl.constexpr, PERM: tl.constexpr, INTERP: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    CPW: tl.constexpr = 16 if BITS == 3 else 32 // BITS          # codes per int32 word
    SUBK: tl.constexpr = BLOCK_K if BLOCK_K < GROUP else GROUP    # a sub-tile is in one group
    NSUB: tl.constexpr = BLOCK_K // SUBK
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n % N                                            # clamp: loads stay in bounds
    k_len = K // SPLIT_K
    k_lo = pid_k * k_len
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_lo + k_len, BLOCK_K):
        for sub in tl.static_range(NSUB):
            ks = k0 + sub * SUBK
            Z, S, MN = int_group_params(s_ptr, z_ptr, rows, ks // GROUP, G, BITS, MODE, DT)
            kw0 = tl.multiple_of(ks // CPW, SUBK // CPW)
            w = int_tile(qw_ptr, rows, kw0, stride_qw, K, Z, S, MN, BITS, MODE, DT, PERM,
                         BLOCK_N, SUBK, INTERP)                   # [BN, SUBK]
            xt = load_xt(x_ptr, ks, M, stride_xm, SUBK, BLOCK_M, CPW, PERM)   # [SUBK, BM]
            acc = dot_acc(w, xt, acc, INTERP)
    offs_m = tl.arange(0, BLOCK_M)
    # SPLIT_K > 1: partial sums go to slice pid_k of a [SPLIT_K, M, N] float32 buffer, summed
    # afterwards in a fixed order (atomics would make results vary from run to run)
    o_ptrs = out_ptr + pid_k * M * stride_om + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _cfg(bn, bk, sk=1, nw=4, ns=1, perm=True, bm=16):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk, "PERM": perm,
            "num_warps": nw, "num_stages": ns}


def candidates(M: int, bits: int, dtype=torch.bfloat16, wgmma: bool = False,
               tma: bool = False) -> list[dict]:
    """Default configs (a short list: each is compiled and timed once per key; ``dtype``, the
    activations', sizes the CUDA-core ones; ``wgmma`` (``wgmma_on``): int_gemm_gluon's DECODE
    configs too, for M > 8; ``tma`` (``tma_on``): int_gemv_tma's DECODE configs for M > 8,
    DECODE8 for M = 5-8)."""
    return [_cfg(64, 256), _cfg(64, 128), _cfg(32, 256), _cfg(64, 256, nw=8),
            _cfg(64, 256, sk=2), _cfg(64, 256, sk=4), _cfg(32, 256, sk=4), _cfg(64, 256, sk=8),
            _cfg(32, 128, sk=8), _cfg(64, 256, perm=False, sk=2), _cfg(64, 64)] \
        + simt_candidates(M, bits, 4 if dtype == torch.float32 else 2) \
        + (planes_candidates(bits) if M >= 2 and planes_on() else []) \
        + ([{**c, "GLUON": True} for c in _gluon().CONFIGS]
           if gluon_on() and bits == 4 and dtype in (torch.bfloat16, torch.float16) else []) \
        + ([{**c, "WGMMA": True} for c in _wgmma().DECODE] if wgmma and bits == 4 and M > 8 else []) \
        + ([{**c, "TMA": True} for c in (_tma().DECODE if M > 8 else _tma().DECODE8)]
           if tma and bits == 4 and M > 4 else [])


def _gluon():
    """The Gluon prototype's module, imported only when asked for (it costs start-up time)."""
    from runtime.kernels import int_gemv_gluon
    return int_gemv_gluon


def _wgmma():
    """The wgmma GEMM's module (int_gemm_gluon.py), imported only when asked for."""
    from runtime.kernels import int_gemm_gluon
    return int_gemm_gluon


def _tma():
    """The TMA-ring decode GEMV's module (int_gemv_tma.py), imported only when asked for."""
    from runtime.kernels import int_gemv_tma
    return int_gemv_tma


def tma_on(x: torch.Tensor) -> bool:
    """Whether the tuner is offered the TMA-ring decode GEMV (M = 5-16) for x: sm_90, bf16/fp16,
    Gluon with TMA, unless ``EXA_GEMV_TMA=0`` (benchmarks/RESULTS.md, "a TMA ring and a
    producer warp")."""
    from runtime.kernels.int_gemm import gluon_on as on
    return on(x, "EXA_GEMV_TMA", "1") and _tma().HAVE_GLUON


def wgmma_on(x: torch.Tensor) -> bool:
    """Whether the tuner is offered the wgmma kernel's decode configs for x: sm_90, bf16/fp16,
    and ``EXA_GEMV_WGMMA=1`` (off by default: benchmarks/RESULTS.md, "wgmma as a decode GEMV
    at M = 16")."""
    from runtime.kernels.int_gemm import gluon_on as on
    return on(x, "EXA_GEMV_WGMMA", "0")


def gluon_on() -> bool:
    """Whether the tuner is offered the Gluon kernel (int_gemv_gluon.py): where Triton has Gluon,
    unless ``EXA_GEMV_GLUON=0``. Measured on H100 only, so each such config must also match a
    tensor-core config's output before the tuner may keep it (a config that fails to compile
    on another GPU is skipped by the tuner)."""
    return os.environ.get("EXA_GEMV_GLUON", "1") != "0" and _gluon().HAVE_GLUON


def _valid(cfg: dict, M: int, N: int, K: int, bits: int, group: int, spec: QuantSpec | None = None) -> bool:
    if cfg.get("GLUON"):
        return spec is not None and not interpreting() and _gluon().valid(cfg, M, N, K, spec)
    if cfg.get("WGMMA"):
        return spec is not None and _wgmma().valid(cfg, M, N, K, spec)
    if cfg.get("TMA"):
        return spec is not None and _tma().valid(cfg, M, N, K, spec)
    if cfg.get("SIMT"):
        return simt_valid(cfg, M, K, bits, group)
    if cfg.get("PLANES"):
        return planes_valid(cfg, M, K, bits, group)
    cpw = 16 if bits == 3 else 32 // bits
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    subk = min(bk, group)
    return not (K % (bk * sk) or subk % cpw or group % subk or bk % subk or subk < 16
                or cfg["BLOCK_M"] < M)


def launch(x, t, spec, N, K, cfg, out=None):
    """Run one config. x [M, K]; returns out [M, N] in x.dtype."""
    if cfg.get("GLUON"):
        return _gluon().launch(x, t, spec, N, K, cfg, out)
    if cfg.get("WGMMA"):
        return _wgmma().launch(x, t, spec, N, K, cfg, out)
    if cfg.get("TMA"):
        return _tma().launch(x, t, spec, N, K, cfg, out)
    M = x.shape[0]
    g = group_of(spec, K)
    mode = mode_of(spec)
    qw = t["qweight"].view(torch.int32)
    zt = t["scales"] if mode == 0 else t["zeros" if mode == 1 else "mins"]
    sk = cfg["SPLIT_K"]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    dst = partials(out, sk)
    cnt = fused_counters(cfg, x.device, triton.cdiv(N, cfg["BLOCK_N"]))
    if cfg.get("SIMT"):
        simt_launch(x, qw, t["scales"], zt, dst, N, K, g, mode, spec.bits, cfg,
                    fin=None if cnt is None else out, cnt=cnt)
    elif cfg.get("PLANES"):
        planes_launch(x, qw, t["scales"], zt, dst, N, K, g, mode, spec.bits, cfg, interpreting())
    else:
        _int_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), sk)](
            x, qw, t["scales"], zt, dst, M, N, K, K // g, x.stride(0), dst.stride(-2),
            K * spec.bits // 32, BITS=spec.bits, GROUP=g, MODE=mode,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"], SPLIT_K=sk,
            PERM=cfg["PERM"], INTERP=interpreting(),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cnt is None:
        sum_partials(dst, out)           # partial sums added in a fixed order
    return out


CHECKED = ("PLANES", "GLUON", "WGMMA", "TMA")    # kernels whose configs must agree first


def _agrees_with_tc(x, t, spec, N, K, g, mb, cands, out):
    """``check`` for the tuner: a PLANES, GLUON, WGMMA or TMA config (not measured on every GPU) is used only if
    its output matches the first valid tensor-core config's among ``cands()`` on these inputs
    (relative difference below 3e-2: bf16 rounding of two correct sums is ~5e-3)."""
    def base():
        return next((b for b in cands() if not any(b.get(k) for k in CHECKED + ("SIMT",))
                     and _valid(b, mb, N, K, spec.bits, g)), None)
    return agrees_with(base, lambda c: any(c.get(k) for k in CHECKED),
                       lambda c: launch(x, t, spec, N, K, c, out))


def int_gemv(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int, out=None) -> torch.Tensor:
    """Decode GEMV: x [M, K] (M <= 16) -> [M, N] in x.dtype. Autotuned per (N, K, M bucket)."""
    check_int_inputs(x, t, spec, N, K)
    M = x.shape[0]
    assert 1 <= M <= 16, f"int_gemv handles M = 1..16, got {M}"
    g = group_of(spec, K)
    mb = m_bucket(M)
    key = (N, K, mb, spec.bits, g, mode_of(spec), x.dtype)
    cands = lambda: candidates(mb, spec.bits, x.dtype, wgmma_on(x), tma_on(x))   # noqa: E731 - on a tuner miss only
    cfg = TUNER.pick(key, cands, lambda c: _valid(c, mb, N, K, spec.bits, g, spec),
                     lambda c: launch(x, t, spec, N, K, c, out), x.is_cuda,
                     check=_agrees_with_tc(x, t, spec, N, K, g, mb, cands, out),
                     fits_l2=lambda: x.is_cuda and packed_bytes(t) <= l2_bytes())
    return launch(x, t, spec, N, K, cfg, out)
