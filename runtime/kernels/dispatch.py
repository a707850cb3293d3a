"""One entry point for quantized linear layers: pick the Triton kernel, or say that none applies.

``quant_linear`` returns None (the caller falls back to ``reference.ref_linear`` or its own path)
when no kernel applies: tensors not on CUDA, triton missing, the ``int8`` format (LLM.int8 is
handled elsewhere), activations other than float16/bfloat16, or a shape the kernels do not tile
(K not a multiple of 32 or of the group size, groups not a multiple of 16 codes).
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Iterable, Mapping

import torch

from runtime.quant.spec import QuantSpec

DECODE_MAX_M = 16                       # M <= this: the GEMV kernels; above: the GEMM kernels
DEFAULT_WARMUP_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_FAILED: set = set()                   # (spec, N, K, gemm?, dtype) whose kernels did not build


def supported(spec: QuantSpec, N: int, K: int, dtype: torch.dtype) -> bool:
    """Whether a kernel covers this format, shape and activation dtype (device aside).

    The kernels tile K by 64 (every launcher keeps a BLOCK_K = 64 config) and a tile must sit
    inside one group: K % 64 == 0, and the group is the whole row or a power of two that
    divides K and holds at least 16 codes (and a whole int32 word of codes).
    """
    if not _HAS_TRITON or dtype not in (torch.float16, torch.bfloat16) or K % 64 or N < 1:
        return False
    if spec.fmt not in ("int", "nf4", "fp4"):
        return False                     # int8: LLM.int8 lives elsewhere
    g = K if spec.group_size == -1 else spec.group_size
    cpw = 16 if spec.bits == 3 else 32 // spec.bits
    return g == K or (K % g == 0 and g >= max(16, cpw) and g & (g - 1) == 0)


def _kernel(spec: QuantSpec, M: int):
    if spec.fmt == "int":
        if M <= DECODE_MAX_M:
            from runtime.kernels.int_gemv import int_gemv
            return int_gemv
        from runtime.kernels.int_gemm import int_gemm
        return int_gemm
    if M <= DECODE_MAX_M:
        from runtime.kernels.nf4_gemv import nf4_gemv
        return nf4_gemv
    from runtime.kernels.nf4_gemm import nf4_gemm
    return nf4_gemm


def quant_linear(x: torch.Tensor, t: Mapping[str, torch.Tensor], spec: QuantSpec, N: int, K: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x [..., K] @ W.T (+ bias)`` -> ``[..., N]`` through a Triton kernel, or None.

    Args:
        x: activations ``[..., K]``, float16 or bfloat16, on a CUDA device.
        t: the packed tensors of ``spec``'s format (see ``runtime/quant/spec.py``).
        spec: the quantization format.
        N, K: the weight's output and input features (W is ``[N, K]``).
        bias: optional ``[N]``, added to the result.

    Returns:
        The result in ``x.dtype``, or None when no kernel applies (see the module docstring).
    """
    if not x.is_cuda or x.shape[-1] != K or not supported(spec, N, K, x.dtype):
        return None
    lead = x.shape[:-1]
    M = x.numel() // K
    if M == 0:
        return x.new_empty(*lead, N)
    x2 = x.reshape(M, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    key = (spec, N, K, M > DECODE_MAX_M, x.dtype)
    if key in _FAILED:
        return None
    try:
        out = _kernel(spec, M)(x2, t, spec, N, K)
    except (RuntimeError, ValueError) as e:     # e.g. no config compiles with this triton
        if "CUDA error" in str(e) or "illegal memory access" in str(e):
            raise                                # a device fault is not a missing kernel
        _FAILED.add(key)
        warnings.warn(f"exa: no quantized kernel for {spec.name} {N}x{K} "
                      f"({'GEMM' if M > DECODE_MAX_M else 'GEMV'}, {x.dtype}): {str(e)[:200]}; "
                      "using the dequantize-then-matmul fallback", RuntimeWarning, stacklevel=2)
        return None
    if bias is not None:
        out += bias.to(out.dtype)
    return out.reshape(*lead, N)


def warmup(spec: QuantSpec, N: int, K: int, dtype: torch.dtype = torch.bfloat16, device="cuda",
           m_values: Iterable[int] = DEFAULT_WARMUP_M) -> int:
    """Run the autotuner once per M bucket for this layer shape, so first tokens are not slow.

    Uses random packed weights of ``spec``'s layout (tuning depends on the shape, not the
    values). Returns the number of buckets tuned (0 when no kernel applies here).
    """
    from runtime.kernels.reference import random_quantized
    device = torch.device(device)
    if device.type != "cuda" or not supported(spec, N, K, dtype):
        return 0
    gen = torch.Generator(device=device).manual_seed(0)
    t = random_quantized(spec, N, K, device=device, generator=gen)
    done = 0
    for M in m_values:
        x = torch.randn(M, K, generator=gen, device=device).to(dtype)
        quant_linear(x, t, spec, N, K)
        done += 1
    torch.cuda.synchronize(device)
    return done
