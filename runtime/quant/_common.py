"""Helpers shared by the format modules: input checks and the optional kernel dispatch.

Nothing here knows a format; each format module (intq, bnb4, int8) calls these.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .spec import QuantSpec

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]

_UNSET = object()
_dispatch: object = _UNSET      # runtime.kernels.dispatch.quant_linear, or None once known absent


def check_weight(w: Tensor, spec: QuantSpec) -> tuple[int, int]:
    """Check that ``w`` is a finite 2-D float weight ``[N, K]``; return ``(N, K)``."""
    if w.dim() != 2:
        raise ValueError(f"{spec.name}: weight must be 2-D [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{spec.name}: weight must be a float tensor, got {w.dtype}")
    if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{spec.name}: weight contains inf or NaN")
    return int(w.shape[0]), int(w.shape[1])


def check_tensors(t: dict[str, Tensor], shapes: Shapes, spec: QuantSpec) -> None:
    """Raise ValueError naming the first packed tensor whose name, shape or dtype is wrong."""
    missing = [k for k in shapes if k not in t]
    if missing:
        raise ValueError(f"{spec.name}: missing packed tensor(s) {missing}; expected {sorted(shapes)}")
    for name, (shape, dtype) in shapes.items():
        got = t[name]
        if tuple(got.shape) != shape or got.dtype != dtype:
            raise ValueError(f"{spec.name}: packed tensor {name!r} should be {shape} {dtype}, "
                             f"got {tuple(got.shape)} {got.dtype}")


def inverse_perm(t: dict[str, Tensor], device) -> Optional[Tensor]:
    """The column gather that puts packed tensors ``t`` back in the original order (the inverse
    of their ``perm``, spec ``act_order``), or None without one."""
    perm = t.get("perm")
    return None if perm is None else torch.argsort(perm.to(device, torch.long))


def natural_order(w: Tensor, t: dict[str, Tensor]) -> Tensor:
    """``w [N, K]`` in the packed column order of ``t`` -> the original order: with a ``perm``
    (spec ``act_order``) ``W[:, perm[j]] = Wp[:, j]``; without one, ``w`` itself."""
    inv = inverse_perm(t, w.device)
    return w if inv is None else w.index_select(1, inv)


def group_of(spec: QuantSpec, K: int, ragged: bool = False) -> int:
    """The group (block) length along K: ``spec.group_size``, or K for per-channel (-1).

    Raises ValueError when K is not a positive multiple of it, unless ``ragged`` (the format
    then allows a shorter last group: ceil(K / g) groups).
    """
    if K <= 0:
        raise ValueError(f"{spec.name}: in_features must be positive, got {K}")
    g = K if spec.group_size == -1 else spec.group_size
    if K % g and not ragged:
        raise ValueError(f"{spec.name}: in_features K={K} is not divisible by group_size {g}")
    return g


def kernel_linear(x: Tensor, t: dict[str, Tensor], spec: QuantSpec, N: int, K: int,
                  bias: Optional[Tensor]) -> Optional[Tensor]:
    """Run ``runtime.kernels.dispatch.quant_linear`` when x is on CUDA and it is importable.

    Returns None (caller falls back to the torch reference) on CPU, when the kernels package
    is absent or fails to import, or when the dispatcher has no kernel for this case.
    """
    if not x.is_cuda:
        return None
    fn = _get_dispatch()
    if fn is None:
        return None
    return fn(x, t, spec, N, K, bias)


def _get_dispatch() -> Optional[Callable]:
    global _dispatch
    if _dispatch is _UNSET:
        try:
            from ..kernels.dispatch import quant_linear
            _dispatch = quant_linear
        except ImportError:
            _dispatch = None
        except Exception as e:  # a broken triton install must not break the reference path
            warnings.warn(f"runtime.kernels failed to import ({e!r}); using the torch reference")
            _dispatch = None
    return _dispatch  # type: ignore[return-value]


def reference_linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` in x.dtype with ``w [N, K]`` already dequantized to x.dtype."""
    b = None if bias is None else bias.to(dtype=x.dtype, device=x.device)
    return torch.nn.functional.linear(x, w, b)
