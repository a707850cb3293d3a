"""Hybrid execution: a pinned-RAM layer block whose linears run on the host CPU.

In a phase where the planner computes block *b* on the CPU (``Placement.cpu_compute`` for
decode steps, ``cpu_compute_prefill`` for prefills), the executor does not stream *b*: it calls
``HostBlock.activate`` instead of acquiring a slot. Then

* *b*'s linear layers (QuantLinear, nn.Linear, transformers' Conv1D) copy their input to the
  host, multiply there with the weights already in pinned RAM (``runtime.kernels.cpu_linear``:
  torch's int4 / int8 CPU kernels on tensors converted once at load, else the format's own
  reference path) and copy the result back;
* everything else in *b* -- attention, norms, rotary embeddings, the KV cache -- runs on the
  compute device as usual, with *b*'s small non-linear parameters (norm weights) bound to
  device copies made once at load (``BlockSpec.cpu_small`` bytes, planned on the device).

In the other phase the same block is streamed through the ring like any other and its linears
run their normal forward: each linear's ``forward`` is shadowed by an instance attribute that
checks ``HostBlock.active`` first. ``block_costs`` gives the planner a block's extra host bytes
(the converted copies), its device bytes, and whether it may be computed on the CPU at all.
"""
from __future__ import annotations

import functools
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.blocks import views
from runtime.kernels import cpu_linear
from runtime.loader import BlockDef
from runtime.quant.linear import QuantLinear, _conv1d_class

__all__ = ["HostBlock", "HostEmbed", "block_costs", "is_linear", "phase_of", "PHASES"]

PHASES = ("decode", "prefill")
SMALL_FRACTION = 8       # a block qualifies when its non-linear tensors are <= 1/8 of its bytes


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer the host can compute (QuantLinear, Linear, Conv1D)."""
    conv1d = _conv1d_class()
    return isinstance(module, (QuantLinear, nn.Linear)) or (conv1d is not None and isinstance(module, conv1d))


def block_costs(block: BlockDef, dtype: torch.dtype) -> tuple[int, int, bool]:
    """``(cpu_extra, cpu_small, cpu_ok)`` of ``block`` for ``runtime.planner.BlockSpec``.

    cpu_extra: host bytes of its linears converted for the CPU kernels; cpu_small: bytes of
    its other parameters (copied to the device); cpu_ok: a layer block whose linears hold
    its bulk (a MoE block with expert tensors outside linears does not qualify).
    """
    extra = small = big = 0
    seen: set[int] = set()
    for (_, module, _), entry in zip(block.params, block.layout.entries):
        if not is_linear(module):
            small += entry.nbytes
            continue
        big += entry.nbytes
        if isinstance(module, QuantLinear) and id(module) not in seen:
            seen.add(id(module))
            extra += cpu_linear.converted_nbytes(module.spec, module.out_features, module.in_features, dtype)
    if block.kind == "embed":      # looked up on the host when plain embeddings (HostEmbed)
        mods = [m for _, m, _ in block.params]
        return 0, 0, all(isinstance(m, nn.Embedding) for m in mods)
    ok = block.kind == "layer" and big > 0 and small * SMALL_FRACTION <= block.nbytes
    return extra, small, ok


def phase_of(args: tuple, kwargs: Mapping) -> str:
    """"decode" for a forward pass of one new token per sequence (``[B, 1]``), else "prefill"."""
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    x = args[0] if x is None and args else x
    return "decode" if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] == 1 else "prefill"


class HostBlock:
    """One block computed on the host CPU in some phases (see the module docstring).

    Args:
        block: the block (its parameters and layout).
        host: the block's bytes in (pinned) host RAM, laid out as ``block.layout``.
        device: the compute device (where the small parameters are copied).
        dtype: the model's compute dtype (picks the CPU kernel's dtype).
    """

    def __init__(self, block: BlockDef, host: Tensor, device: torch.device, dtype: torch.dtype):
        self.name, self.active = block.name, False
        self._small: list[tuple[nn.Module, str, nn.Parameter]] = []
        tensors: dict[nn.Module, dict[str, Tensor]] = {}
        for (_, module, attr), view in zip(block.params, views(host, block.layout)):
            if is_linear(module):
                tensors.setdefault(module, {})[attr] = view
            else:
                self._small.append((module, attr, nn.Parameter(view.to(device), requires_grad=False)))
        self._linears = [_HostLinear(self, m, t, dtype) for m, t in tensors.items()]

    def activate(self) -> None:
        """The block runs now with its linears on the host: bind the device copies, switch on."""
        for module, attr, param in self._small:
            module._parameters[attr] = param
        self.active = True

    def deactivate(self) -> None:
        """The block's linears run their normal forward again (streamed, or not running)."""
        self.active = False

    def close(self) -> None:
        """Remove the shadowing forwards (the modules behave as before)."""
        for lin in self._linears:
            lin.uninstall()
        self._linears, self._small, self.active = [], [], False


class _HostLinear:
    """One linear of a HostBlock: its host tensors, its converted weights, its forward."""

    def __init__(self, owner: HostBlock, module: nn.Module, t: dict[str, Tensor], dtype: torch.dtype):
        self.owner, self.module = owner, module
        self.quant = isinstance(module, QuantLinear)
        self.bias, self.perm, self.weight = t.get("bias"), t.get("perm"), t.get("weight")
        if self.quant:
            self.packed = {k: t[k] for k in module.packed_names}
            self.prepared = cpu_linear.prepare(module.spec, self.packed, module.out_features,
                                               module.in_features, dtype)
        self.conv1d = not self.quant and not isinstance(module, nn.Linear)   # weight [in, out]
        module.forward = self.forward          # an instance attribute shadows the class method

    def uninstall(self) -> None:
        if self.module.__dict__.get("forward") == self.forward:
            del self.module.forward

    def forward(self, x: Tensor) -> Tensor:       # [..., K] -> [..., N]
        if not self.owner.active:
            return type(self.module).forward(self.module, x)
        xh = x.to("cpu")
        if self.quant:
            m = self.module
            y = cpu_linear.linear(xh, m.spec, self.packed, m.out_features, m.in_features,
                                  self.prepared, self.bias, self.perm)
        elif self.conv1d:
            y = torch.addmm(self.bias, xh.reshape(-1, xh.shape[-1]), self.weight)
            y = y.reshape(*xh.shape[:-1], self.weight.shape[1])
        else:
            y = F.linear(xh, self.weight, self.bias)
        return y.to(x.device)


class HostEmbed:
    """An embed block looked up on the host in every phase (``Placement.host_compute``).

    Its embeddings' weights are bound once to views of the block's pinned host buffer; each
    embedding's forward takes its inputs (token / position ids) to the host, indexes there
    (only the rows of the input tokens are read) and copies the ``[B, S, hidden]`` result to
    the compute device (a few KiB per decode step, so a plain synchronous copy). Never streamed.
    """

    def __init__(self, block: BlockDef, host: Tensor, device: torch.device):
        self.name, self.device, self._mods = block.name, device, []
        for (_, module, attr), view in zip(block.params, views(host, block.layout)):
            module._parameters[attr] = nn.Parameter(view, requires_grad=False)
            if module not in self._mods:
                module.forward = functools.partial(self._forward, module)
                self._mods.append(module)

    def _forward(self, module: nn.Module, *args, **kwargs) -> Tensor:
        cpu = [a.to("cpu") if isinstance(a, Tensor) else a for a in args]
        kw = {k: v.to("cpu") if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        saved = dict(module._buffers)            # e.g. a scaled embedding's scale: host copies meanwhile
        module._buffers.update({k: None if v is None else v.to("cpu") for k, v in saved.items()})
        try:
            return type(module).forward(module, *cpu, **kw).to(self.device)
        finally:
            module._buffers.update(saved)

    def close(self) -> None:
        """Remove the shadowing forwards."""
        for m in self._mods:
            if isinstance(m.__dict__.get("forward"), functools.partial):
                del m.forward
        self._mods = []
