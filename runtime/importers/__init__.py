"""Importers: run GPTQ / AWQ / bitsandbytes / GGUF checkpoints as they are, in exa's formats.

One module per source format (``gptq``, ``awq``, ``bnb``, ``gguf``). The safetensors ones share
one small interface::

    detect(qcfg) -> bool                  # qcfg: config.json's "quantization_config"
    model_spec(qcfg, sample) -> QuantSpec # sample(role): a tensor of the first quantized linear
    owners(keys) -> [module name]         # the quantized linears, from the checkpoint's keys
    roles(owner, keys) -> {role: key}     # the source tensors of one linear
    convert(tensors_by_role, qcfg, name) -> (QuantSpec, exa packed tensors)

:class:`~runtime.importers.checkpoint.ImportedCheckpoint` wraps a safetensors checkpoint and
converts one linear at a time when the loader asks for its packed tensors, so a model is never
held in memory whole; :class:`~runtime.importers.gguf_checkpoint.GGUFNativeCheckpoint` does the
same for .gguf files. Both look like an exa checkpoint to the engine (``quant``,
``skip_modules``, ``keys``, ``get``).
"""
from __future__ import annotations

from types import ModuleType

from . import awq, bnb, gptq

IMPORTERS: dict[str, ModuleType] = {"gptq": gptq, "awq": awq, "bitsandbytes": bnb}


def importer_for(qcfg: dict | None) -> ModuleType | None:
    """The importer module for a ``quantization_config`` dict, or None (not quantized / unknown)."""
    if not isinstance(qcfg, dict):
        return None
    return next((m for m in IMPORTERS.values() if m.detect(qcfg)), None)


def linear_names(model) -> list[str]:
    """Qualified names of the linear layers (nn.Linear, transformers Conv1D) of a skeleton."""
    from torch import nn
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:                    # noqa: BLE001 - transformers without Conv1D
        Conv1D = ()
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, Conv1D or ()))]


__all__ = ["IMPORTERS", "importer_for", "linear_names"]
