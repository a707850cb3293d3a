"""Quantization formats: one module per format, all with the same four functions.

``packed_shapes(spec, N, K)``, ``quantize(w, spec)``, ``dequantize(t, spec, N, K, dtype)`` and
``linear(x, t, spec, N, K, bias)``; pick the module from metadata with :func:`module_for`.
The layouts are specified in :mod:`runtime.quant.spec`; :class:`QuantLinear` (in
:mod:`runtime.quant.linear`) is the nn.Module that holds the packed tensors as parameters.
"""
from __future__ import annotations

from types import ModuleType

from . import bnb4, int8, intq
from .spec import QuantSpec

FORMATS: dict[str, ModuleType] = {"int": intq, "nf4": bnb4, "fp4": bnb4, "int8": int8}


def module_for(spec: QuantSpec) -> ModuleType:
    """The format module (intq, bnb4 or int8) that implements ``spec.fmt``."""
    try:
        return FORMATS[spec.fmt]
    except KeyError:
        raise ValueError(f"unknown quantization format {spec.fmt!r}; known: {', '.join(FORMATS)}") from None


from .linear import QuantLinear, swap_linears  # noqa: E402  (linear.py uses module_for lazily)

__all__ = ["FORMATS", "QuantSpec", "module_for", "QuantLinear", "swap_linears"]
