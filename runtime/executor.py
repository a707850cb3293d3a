"""The one loop: run the model's own forward, with each block's weights bound just in time.

transformers' model walks its layers itself; the executor hooks into that walk. Resident
blocks are bound once. For a streamed block, the pre-forward hook waits for the block's slot
(``Prefetcher.acquire``) and binds every parameter of the block as a view into the slot; the
post-forward hook releases the slot, which immediately starts loading the next block into it.
The embedding block is released when layer 0 starts, and the head block is acquired when the
last layer ends, so every streamed block, whatever its kind, goes through the same ring.

Hybrid execution: the model's pre-forward hook tells the phase from the input's shape (one new
token per sequence = "decode", else "prefill"), switches the ring to that phase's order (the
streamed blocks minus those the phase computes on the CPU) and, for those blocks, activates
their ``HostBlock`` (runtime/hybrid.py) instead of acquiring a slot.
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.blocks import views
from runtime.hybrid import PHASES, HostBlock, HostEmbed, phase_of
from runtime.loader import BlockDef
from runtime.prefetch import Prefetcher


def bind(block: BlockDef, buf: torch.Tensor) -> None:
    """Point every parameter of ``block`` at its view inside ``buf`` (no copy)."""
    for (_, module, attr), view in zip(block.params, views(buf, block.layout)):
        module._parameters[attr] = nn.Parameter(view, requires_grad=False)


class Executor:
    """Runs ``model`` with its blocks bound in time.

    ``host_blocks`` / ``cpu_sets``: the blocks computed on the CPU, and per phase ("decode",
    "prefill") the names computed there in that phase (every one of them has a HostBlock).
    ``host_embeds``: blocks looked up on the host in every phase (never bound, never streamed).
    """

    def __init__(self, model: nn.Module, layers: nn.ModuleList, blocks: list[BlockDef],
                 resident: dict[str, torch.Tensor], prefetcher: Prefetcher | None,
                 host_blocks: dict[str, HostBlock] | None = None, cpu_sets: dict | None = None,
                 host_embeds: dict[str, HostEmbed] | None = None):
        self.model, self.prefetcher = model, prefetcher
        self.blocks = {b.name: b for b in blocks}
        for name, buf in resident.items():
            bind(self.blocks[name], buf)
        self.host_embeds = dict(host_embeds or {})
        self.streamed = {b.name for b in blocks if b.name not in resident and b.name not in self.host_embeds}
        if self.streamed and prefetcher is None:
            raise ValueError("streamed blocks need a prefetcher")
        self.host = dict(host_blocks or {})
        self.cpu_sets = {ph: frozenset((cpu_sets or {}).get(ph, ())) for ph in PHASES}
        missing = sorted(n for s in self.cpu_sets.values() for n in s if n not in self.host or n not in self.streamed)
        if missing:
            raise ValueError(f"blocks computed on the CPU need a HostBlock and a host home: {missing[:3]}")
        order = prefetcher.order if prefetcher is not None else []
        self.orders = {ph: [n for n in order if n not in self.cpu_sets[ph]] for ph in PHASES}
        self.cpu_now: frozenset = frozenset()
        self._handles = []
        if self.streamed:
            self._install(layers)

    def _install(self, layers: nn.ModuleList) -> None:
        last = len(layers) - 1
        hooks = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                 self.model.register_forward_hook(lambda *_: self._leave("head"))]
        for i, layer in enumerate(layers):
            name = f"layers.{i}"
            hooks.append(layer.register_forward_pre_hook(
                lambda *_, n=name, first=(i == 0): self._layer_pre(n, first)))
            hooks.append(layer.register_forward_hook(
                lambda *_, n=name, final=(i == last): self._layer_post(n, final)))
        self._handles = hooks

    def _begin(self, module, args, kwargs) -> None:
        phase = phase_of(args, kwargs)
        self.cpu_now = self.cpu_sets[phase]
        self.prefetcher.set_order(self.orders[phase])
        self._enter("embed")

    def _enter(self, name: str) -> None:
        if name not in self.streamed:
            return
        host = self.host.get(name)
        if name in self.cpu_now:
            host.activate()
            return
        if host is not None:
            host.deactivate()
        bind(self.blocks[name], self.prefetcher.acquire(name))

    def _leave(self, name: str) -> None:
        if name not in self.streamed:
            return
        if name in self.cpu_now:
            self.host[name].deactivate()
        else:
            self.prefetcher.release(name)

    def _layer_pre(self, name: str, first: bool) -> None:
        if first:
            self._leave("embed")
        self._enter(name)

    def _layer_post(self, name: str, final: bool) -> None:
        self._leave(name)
        if final:
            self._enter("head")

    def run(self, fn, *args, **kwargs):
        """Call ``fn`` (a forward pass); on any error the ring is drained and restarted."""
        try:
            return fn(*args, **kwargs)
        except BaseException:
            for host in self.host.values():
                host.deactivate()
            if self.prefetcher is not None:
                self.prefetcher.reset()
            raise

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for host in [*self.host.values(), *self.host_embeds.values()]:
            host.close()
        if self.prefetcher is not None:
            self.prefetcher.close()
