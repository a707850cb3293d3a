"""AWQ: activation-aware per-channel scales, searched per group of linears, then RTN.

AWQ (Lin et al., 2023) protects the input channels that carry large activations: for a group of
linears reading the same input x, it multiplies their weights' input columns by
``s = mean|x|^alpha`` (normalised so that ``sqrt(max s * min s) = 1``) and divides the op that
produces x by s (a norm's weight, or the output rows and bias of a previous linear), which
leaves the float model's function unchanged. ``alpha`` is searched on a grid in [0, 1]: the
one whose fake-quantized weights ``Q(W * s) / s`` give the smallest MSE of the ``inspect``
module's output (e.g. the whole attention for q/k/v) wins; ``alpha = 0`` is plain RTN, so the
search never does worse than RTN on that measure. The scaled weights are then quantized with
RTN in exa's int format (intq.quantize). Which linears group together comes from the table in
runtime/models/groups.py. Weight clipping search (AWQ's second step) is not implemented.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from runtime.models.groups import ScaleGroup

from . import intq
from .spec import QuantSpec

__all__ = ["Call", "fake_quant", "can_fold", "search_scale", "apply_scale"]

Call = tuple[tuple, dict]           # (args, kwargs) of one recorded call of the inspect module


def fake_quant(w: Tensor, spec: QuantSpec) -> Tensor:
    """``w [N, K]`` quantized with RTN and dequantized back (float32)."""
    return intq.dequantize(intq.quantize(w, spec), spec, *w.shape)


def _input_of(call: Call) -> Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_input(call: Call, x: Tensor) -> Call:
    args, kwargs = call
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _run(module: nn.Module, call: Call) -> Tensor:
    out = module(*call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


def can_fold(prev: nn.Module, K: int) -> bool:
    """Whether ``1/s`` (length K) can be folded into ``prev``: a norm weight or linear rows of size K."""
    if isinstance(prev, nn.Linear):
        return prev.out_features == K
    w = getattr(prev, "weight", None)
    return isinstance(w, Tensor) and w.dim() == 1 and w.numel() == K and not hasattr(prev, "spec")


def search_scale(group: ScaleGroup, layer: nn.Module, calls: Sequence[Call], spec: QuantSpec,
                 n_grid: int = 20, search_calls: int | None = None) -> tuple[Tensor, float, float] | None:
    """Best per-channel scale for ``group`` inside ``layer`` (float weights, modified only
    temporarily), judged on the recorded ``calls`` of its inspect module: ``mean|x|`` over all
    of them, the output MSE over the first ``search_calls`` (all when None).

    Returns ``(s [K], alpha, mse)``, or None when ``1/s`` cannot be folded into ``group.prev``
    (e.g. v_proj -> o_proj under grouped-query attention, whose widths differ).
    """
    inspect = layer.get_submodule(group.inspect)
    linears = [layer.get_submodule(n) for n in group.linears]
    K = linears[0].in_features
    if not can_fold(layer.get_submodule(group.prev), K) or any(l.in_features != K for l in linears):
        return None
    dev = linears[0].weight.device
    total, count = torch.zeros(K, device=dev), 0
    for c in calls:                                                 # mean |x| per input channel
        x = _input_of(c).detach().reshape(-1, K).float()
        total += x.abs().sum(0)
        count += x.shape[0]
    x_mean = total / max(count, 1)                                  # [K]
    calls = calls[:search_calls] if search_calls else calls
    refs = [_run(inspect, c).detach() for c in calls]               # float outputs
    originals = [l.weight.detach().clone() for l in linears]
    best: tuple[float, float, Tensor] | None = None
    try:
        for i in range(n_grid + 1):
            alpha = i / n_grid
            s = x_mean.pow(alpha).clamp(min=1e-4)
            s = s / math.sqrt(float(s.max() * s.min()))
            for l, w in zip(linears, originals):
                l.weight.data.copy_(fake_quant(w * s, spec) / s)
            err = sum(float(((_run(inspect, c) - r).float() ** 2).mean()) for c, r in zip(calls, refs))
            err /= max(len(calls), 1)
            if best is None or err < best[0]:
                best = (err, alpha, s)
    finally:
        for l, w in zip(linears, originals):
            l.weight.data.copy_(w)
    return best[2], best[1], best[0]


@torch.no_grad()
def apply_scale(group: ScaleGroup, layer: nn.Module, s: Tensor) -> None:
    """Scale the group's input columns by ``s`` and fold ``1/s`` into ``group.prev`` (in place)."""
    prev = layer.get_submodule(group.prev)
    for n in group.linears:
        lin = layer.get_submodule(n)
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))


def record_calls(modules: dict[str, nn.Module]) -> tuple[dict[str, list[Call]], list]:
    """Pre-forward hooks that record every call's (args, kwargs) per module; returns (calls, handles)."""
    calls: dict[str, list[Call]] = {n: [] for n in modules}
    handles = []
    for n, m in modules.items():
        def hook(mod, args, kwargs, n=n):
            calls[n].append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs)))
        handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles
