"""QuantLinear: an nn.Module holding one quantized weight as plain parameters, and swap_linears.

The packed tensors of the format (``runtime.quant.spec``) are registered as parameters under
their own names (``qweight``, ``scales``, ``zeros`` / ``mins``, ``absmax`` ...), created on
``device`` (meta by default) so that the engine can bind them as views into block buffers
exactly like the parameters of an ordinary layer.

With ``spec.act_order`` (imported GPTQ act-order checkpoints) the module also holds ``perm``
int32 ``[K]``: the packed weight's columns are the original ones in ``perm`` order, and
``forward`` gathers ``x[..., perm]`` before the quantized matmul (exact: a reordering of the
dot product's terms only changes the float summation order).
"""
from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._common import natural_order
from .spec import QuantSpec


def _fmt(spec: QuantSpec):
    from . import module_for  # lazy: the package imports this module
    return module_for(spec)


def _conv1d_class() -> Optional[type]:
    """transformers' GPT-2 style ``Conv1D`` (weight ``[in, out]``), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return None
    return Conv1D


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W ``[out_features, in_features]`` stored quantized.

    Args:
        in_features: K, the input width.
        out_features: N, the output width.
        bias: whether the layer has a bias (a ``[N]`` parameter of ``bias_dtype``).
        spec: the quantization format (fmt, bits, group_size, ...).
        device: where the (uninitialised) parameters are created; "meta" by default.
        bias_dtype: dtype of the bias parameter.

    Raises:
        ValueError: if the format cannot store an ``[N, K]`` weight (e.g. K % group_size != 0).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec,
                 device: torch.device | str = "meta", bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.spec = spec
        shapes = _fmt(spec).packed_shapes(spec, self.out_features, self.in_features)
        self.packed_names: tuple[str, ...] = tuple(shapes)
        for name, (shape, dtype) in shapes.items():
            self.register_parameter(name, nn.Parameter(
                torch.empty(shape, dtype=dtype, device=device), requires_grad=False))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=bias_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        if getattr(spec, "act_order", False):   # input permutation (see the module docstring)
            self.perm = nn.Parameter(torch.empty(self.in_features, dtype=torch.int32, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("perm", None)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """``(N, K)`` = (out_features, in_features) of the unquantized weight."""
        return (self.out_features, self.in_features)

    def packed(self) -> dict[str, Tensor]:
        """The packed tensors by name (the current parameters, no copy)."""
        return {name: getattr(self, name) for name in self.packed_names}

    def load_packed(self, t: dict[str, Tensor]) -> None:
        """Copy packed tensors (from the format's ``quantize``) into the parameters.

        With ``spec.act_order`` a ``perm`` int32 ``[K]`` may be given too (default: identity).
        """
        if self.perm is not None:
            perm = t.get("perm", torch.arange(self.in_features, dtype=torch.int32))
            if tuple(perm.shape) != (self.in_features,):
                raise ValueError(f"QuantLinear({self.spec.name}): perm should be [{self.in_features}], "
                                 f"got {tuple(perm.shape)}")
            with torch.no_grad():
                self.perm.copy_(perm.to(torch.int32))
        for name in self.packed_names:
            p = getattr(self, name)
            if name not in t or tuple(t[name].shape) != tuple(p.shape) or t[name].dtype != p.dtype:
                got = None if name not in t else (tuple(t[name].shape), t[name].dtype)
                raise ValueError(f"QuantLinear({self.spec.name}): packed tensor {name!r} should be "
                                 f"{tuple(p.shape)} {p.dtype}, got {got}")
            with torch.no_grad():
                p.copy_(t[name])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reference weight ``[N, K]`` in ``dtype``, in the original column order."""
        w = _fmt(self.spec).dequantize(self.packed(), self.spec, self.out_features,
                                       self.in_features, dtype=dtype)
        return w if self.perm is None else natural_order(w, {"perm": self.perm})

    def forward(self, x: Tensor) -> Tensor:  # [..., K] -> [..., N]
        if self.perm is not None:
            x = x.index_select(-1, self.perm.to(device=x.device, dtype=torch.long))  # [..., K] permuted
        return _fmt(self.spec).linear(x, self.packed(), self.spec, self.out_features,
                                      self.in_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant={self.spec.name}")

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec) -> "QuantLinear":
        """Quantize a real ``nn.Linear`` (or a transformers ``Conv1D``, transposed first) with RTN.

        The result lives on the weight's device; the bias is copied in its own dtype.
        """
        w = linear.weight.detach()
        conv1d = _conv1d_class()
        if conv1d is not None and isinstance(linear, conv1d):
            w = w.t()                                                # [in, out] -> [out, in]
        N, K = w.shape
        b = getattr(linear, "bias", None)
        q = cls(K, N, b is not None, spec, device=w.device,
                bias_dtype=b.dtype if b is not None else torch.float32)
        q.load_packed(_fmt(spec).quantize(w, spec))
        if b is not None:
            with torch.no_grad():
                q.bias.copy_(b.detach())
        return q


def _skipped(name: str, skip: Sequence[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p) for p in skip)


def swap_linears(root: nn.Module, spec: QuantSpec, skip: Sequence[str] = ("lm_head",),
                 device: torch.device | str = "meta") -> dict[str, tuple[QuantLinear, bool]]:
    """Replace the linear layers under ``root`` by (empty) QuantLinear modules on ``device``.

    Every ``nn.Linear`` and every transformers ``Conv1D`` (GPT-2 style, weight ``[in, out]``)
    whose qualified name matches no ``skip`` pattern (``fnmatch`` on the full name or on its
    last component) is replaced. Layers the format cannot store (K not divisible by the group
    size, or K*bits not whole bytes) are left unquantized -- not an error -- and not returned.
    ``root`` itself is never replaced; a module reachable under two names is swapped once.

    Args:
        root: the model (or any sub-module) to modify in place.
        spec: the quantization format.
        skip: fnmatch patterns of layers to keep in full precision.
        device: where the new, uninitialised parameters are created.

    Returns:
        ``{qualified name: (QuantLinear, transposed)}``; ``transposed`` is True for Conv1D,
        whose checkpoint weight ``[in, out]`` must be transposed before quantizing.
    """
    conv1d = _conv1d_class()
    fmt = _fmt(spec)
    todo: list[tuple[str, nn.Module, int, int, bool]] = []
    for name, mod in root.named_modules():
        if not name or _skipped(name, skip):
            continue
        if isinstance(mod, nn.Linear):
            N, K, transposed = mod.out_features, mod.in_features, False
        elif conv1d is not None and isinstance(mod, conv1d):
            (K, N), transposed = tuple(mod.weight.shape), True
        else:
            continue
        try:
            fmt.packed_shapes(spec, N, K)
        except ValueError:
            continue  # documented: left unquantized
        todo.append((name, mod, N, K, transposed))
    out: dict[str, tuple[QuantLinear, bool]] = {}
    for name, mod, N, K, transposed in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        b = getattr(mod, "bias", None)
        q = QuantLinear(K, N, b is not None, spec, device=device,
                        bias_dtype=b.dtype if b is not None else torch.float32)
        setattr(parent, attr, q)
        out[name] = (q, transposed)
    return out
