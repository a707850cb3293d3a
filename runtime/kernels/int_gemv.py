"""Fused dequant + GEMV for decode: ``out [M, N] = x [M, K] @ W.T`` with W in the ``int`` format.

M = 1..16. Memory-bound: every weight byte is read once, as wide vectors of packed int32 words,
dequantized in registers (``tl_dequant``) and multiplied on the tensor cores:
``acc [BN, 16] += W tile [BN, BK] @ x.T tile [BK, 16]`` (M padded to 16; the tensor cores have
time to spare, so the padding costs nothing while the dequant stays at ~2 ops per code). The
weight tile comes out of the dequant in PERM order (pairs of codes packed in one register); the
x tile is permuted to match. Each program owns BLOCK_N rows and a 1/SPLIT_K slice of K;
SPLIT_K > 1 adds float32 partial sums atomically into a zeroed buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.kernels.tl_dequant import int_group_params, int_tile, perm_x
from runtime.kernels.tuning import Tuner, interpreting, m_bucket
from runtime.quant.spec import QuantSpec

TUNER = Tuner("int_gemv")
MODES = {"sym": 0, "int": 1, "min": 2}


@triton.jit
def load_xt(x_ptr, ks, M, stride_xm, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
            CPW: tl.constexpr, PERM: tl.constexpr):
    """x.T tile [BLOCK_K, BLOCK_M] at K offset ks (rows m >= M read as 0), in PERM order."""
    offs_m = tl.arange(0, BLOCK_M)
    if PERM:
        iw = tl.arange(0, BLOCK_K // CPW)
        j = tl.arange(0, CPW)
        ptrs = x_ptr + offs_m[None, None, :] * stride_xm + (ks + iw[:, None, None] * CPW + j[None, :, None])
        x3 = tl.load(ptrs, mask=offs_m[None, None, :] < M, other=0.0)       # [BK/CPW, CPW, BM]
        return perm_x(tl.reshape(x3, [BLOCK_K, BLOCK_M]), BLOCK_K, BLOCK_M, CPW)
    else:
        offs_k = ks + tl.arange(0, BLOCK_K)
        return tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                       mask=offs_m[None, :] < M, other=0.0)


@triton.jit
def _dot(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b; through float32 in the interpreter (its bf16 dot is wrong) and for fp32."""
    if INTERP or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


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
            acc = _dot(w, xt, acc, INTERP)
    offs_m = tl.arange(0, BLOCK_M)
    o_ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    o_mask = (offs_m[None, :] < M) & (offs_n[:, None] < N)
    if SPLIT_K == 1:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.atomic_add(o_ptrs, acc, mask=o_mask, sem="relaxed")


def _cfg(bn, bk, sk=1, nw=4, ns=1, perm=True, bm=16):
    return {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_K": sk, "PERM": perm,
            "num_warps": nw, "num_stages": ns}


def candidates(M: int, bits: int) -> list[dict]:
    """Default configs (a short list: each is compiled and timed once per key)."""
    return [_cfg(64, 256), _cfg(64, 128), _cfg(128, 128), _cfg(32, 256), _cfg(64, 256, nw=8),
            _cfg(128, 256, nw=8), _cfg(64, 256, sk=2), _cfg(64, 256, perm=False),
            _cfg(64, 256, ns=2), _cfg(128, 128, ns=3)]


def _valid(cfg: dict, M: int, N: int, K: int, bits: int, group: int) -> bool:
    cpw = 16 if bits == 3 else 32 // bits
    bk, sk = cfg["BLOCK_K"], cfg["SPLIT_K"]
    subk = min(bk, group)
    return not (K % (bk * sk) or subk % cpw or group % cpw or bk % subk or subk < 16
                or cfg["BLOCK_M"] < M)


def check_inputs(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int) -> None:
    """Assert what every int kernel assumes about its inputs (clear message on mismatch)."""
    assert spec.fmt == "int" and spec.bits in (2, 3, 4, 8), f"int kernels need fmt int, got {spec}"
    assert x.dim() == 2 and x.shape[1] == K and x.stride(1) == 1, f"x must be [M, {K}] row-contiguous"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"x dtype {x.dtype}"
    qw, s = t["qweight"], t["scales"]
    assert qw.dtype == torch.uint8 and qw.is_contiguous() and qw.numel() == N * K * spec.bits // 8, \
        f"qweight must be contiguous uint8 [N, K*bits/8], got {tuple(qw.shape)} {qw.dtype}"
    g = K if spec.group_size == -1 else spec.group_size
    assert K % g == 0 and K % 32 == 0, f"K={K} must be a multiple of 32 and of the group size {g}"
    assert s.dtype == torch.float16 and s.is_contiguous() and s.numel() == N * (K // g), "scales"
    if not spec.sym:
        z = t["zeros" if spec.zero_mode == "int" else "mins"]
        want = torch.uint8 if spec.zero_mode == "int" else torch.float16
        assert z.dtype == want and z.is_contiguous() and z.numel() == N * (K // g), "zeros/mins"
    assert qw.device == x.device == s.device, "all tensors must be on one device"


def mode_of(spec: QuantSpec) -> int:
    return 0 if spec.sym else MODES[spec.zero_mode]


def launch(x, t, spec, N, K, cfg, out=None):
    """Run one config. x [M, K]; returns out [M, N] in x.dtype."""
    M = x.shape[0]
    g = K if spec.group_size == -1 else spec.group_size
    mode = mode_of(spec)
    qw = t["qweight"].view(torch.int32)
    zt = t["scales"] if mode == 0 else t["zeros" if mode == 1 else "mins"]
    sk = cfg["SPLIT_K"]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    dst = out if sk == 1 else torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), sk)
    _int_gemv_kernel[grid](
        x, qw, t["scales"], zt, dst, M, N, K, K // g, x.stride(0), dst.stride(0),
        K * spec.bits // 32, BITS=spec.bits, GROUP=g, MODE=mode,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_M=cfg["BLOCK_M"], SPLIT_K=sk,
        PERM=cfg["PERM"], INTERP=interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if sk != 1:
        out.copy_(dst)
    return out


def int_gemv(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int, out=None) -> torch.Tensor:
    """Decode GEMV: x [M, K] (M <= 16) -> [M, N] in x.dtype. Autotuned per (N, K, M bucket)."""
    check_inputs(x, t, spec, N, K)
    M = x.shape[0]
    assert 1 <= M <= 16, f"int_gemv handles M = 1..16, got {M}"
    g = K if spec.group_size == -1 else spec.group_size
    mb = m_bucket(M)
    key = (N, K, mb, spec.bits, g, mode_of(spec), x.dtype)
    cfg = TUNER.pick(key, candidates(mb, spec.bits), lambda c: _valid(c, mb, N, K, spec.bits, g),
                     lambda c: launch(x, t, spec, N, K, c, out), x.is_cuda)
    return launch(x, t, spec, N, K, cfg, out)
