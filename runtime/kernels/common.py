"""Host-side checks shared by the kernel launchers: what each kernel assumes about its inputs."""
from __future__ import annotations

import torch

from runtime.quant.spec import QuantSpec

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MODES = {"int": 1, "min": 2}


def packed_bytes(t: dict) -> int:
    """The bytes of a packed weight: all its tensors (packed codes, scales, zeros, ...)."""
    return sum(v.numel() * v.element_size() for v in t.values() if isinstance(v, torch.Tensor))


def group_of(spec: QuantSpec, K: int) -> int:
    """Codes per quantization group along K (per channel: K)."""
    return K if spec.group_size == -1 else spec.group_size


def mode_of(spec: QuantSpec) -> int:
    """0 symmetric, 1 uint8 zero points, 2 float16 mins (the kernels' MODE)."""
    return 0 if spec.sym else _MODES[spec.zero_mode]


def _check_x(x: torch.Tensor, K: int) -> None:
    assert x.dim() == 2 and x.shape[1] == K and x.stride(1) == 1, \
        f"x must be [M, {K}] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}"
    assert x.dtype in ACT_DTYPES, f"x dtype must be one of {ACT_DTYPES}, got {x.dtype}"


def _check(name: str, t, dtype: torch.dtype, numel: int, device) -> torch.Tensor:
    assert name in t, f"packed tensors lack {name!r} (have {sorted(t)})"
    v = t[name]
    assert v.dtype == dtype and v.is_contiguous() and v.numel() == numel and v.device == device, \
        f"{name} must be contiguous {dtype} with {numel} values on {device}, " \
        f"got {v.dtype} {tuple(v.shape)} on {v.device}"
    return v


def check_int_inputs(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int) -> None:
    """Assert what every ``int`` kernel assumes about its inputs (clear message on mismatch)."""
    assert spec.fmt == "int" and spec.bits in (2, 3, 4, 8), f"int kernels need fmt int, got {spec}"
    _check_x(x, K)
    g = group_of(spec, K)
    assert K % 32 == 0 and K % g == 0, f"K={K} must be a multiple of 32 and of the group size {g}"
    qw = _check("qweight", t, torch.uint8, N * K * spec.bits // 8, x.device)
    assert qw.data_ptr() % 16 == 0, "qweight must be 16-byte aligned (it is read as int32 vectors)"
    _check("scales", t, torch.float16, N * (K // g), x.device)
    if not spec.sym:
        if spec.zero_mode == "int":
            _check("zeros", t, torch.uint8, N * (K // g), x.device)
        else:
            _check("mins", t, torch.float16, N * (K // g), x.device)


def check_nf4_inputs(x: torch.Tensor, t, spec: QuantSpec, N: int, K: int) -> None:
    """Assert what the ``nf4`` / ``fp4`` kernels assume about their inputs."""
    assert spec.fmt in ("nf4", "fp4"), f"nf4 kernels need fmt nf4/fp4, got {spec}"
    _check_x(x, K)
    g = group_of(spec, K)
    assert K % g == 0 and K % 32 == 0, f"K={K} must be a multiple of 32 and of the block size {g}"
    qw = _check("qweight", t, torch.uint8, N * K // 2, x.device)
    assert qw.data_ptr() % 16 == 0, "qweight must be 16-byte aligned (it is read as int32 vectors)"
    nb = N * K // g
    if spec.double_quant:
        _check("absmax_q", t, torch.uint8, nb, x.device)
        _check("absmax2", t, torch.float32, (nb + 255) // 256, x.device)
        _check("offset", t, torch.float32, 1, x.device)
    else:
        _check("absmax", t, torch.float32, nb, x.device)


def prepare_gluon(x, t, spec, N, K, c, out, fits, have: bool):
    """The checks both Gluon launchers make (Gluon present, inputs, bf16/fp16 x,
    ``fits(c, M, N, K, spec)``) and the output they write: returns (M, group size, out)."""
    assert have, "triton.experimental.gluon is not available"
    check_int_inputs(x, t, spec, N, K)
    M = x.shape[0]
    assert x.dtype in (torch.bfloat16, torch.float16), "the Gluon kernels take bf16/fp16 x"
    assert fits(c, M, N, K, spec), f"config {c} does not fit M={M} N={N} K={K} {spec}"
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    return M, group_of(spec, K), out
