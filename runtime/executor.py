"""The one loop: run the model's own forward, with each block's weights bound just in time.

transformers' model walks its layers itself; the executor hooks into that walk. Resident
blocks are bound once. For a streamed block, the pre-forward hook waits for the block's slot
(``Prefetcher.acquire``) and binds every parameter of the block as a view into the slot; the
post-forward hook releases the slot, which immediately starts loading the next block into it.
The embedding block is released when layer 0 starts, and the head block is acquired when the
last layer ends, so every streamed block, whatever its kind, goes through the same ring.
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.blocks import views
from runtime.loader import BlockDef
from runtime.prefetch import Prefetcher


def bind(block: BlockDef, buf: torch.Tensor) -> None:
    """Point every parameter of ``block`` at its view inside ``buf`` (no copy)."""
    for (_, module, attr), view in zip(block.params, views(buf, block.layout)):
        module._parameters[attr] = nn.Parameter(view, requires_grad=False)


class Executor:
    def __init__(self, model: nn.Module, layers: nn.ModuleList, blocks: list[BlockDef],
                 resident: dict[str, torch.Tensor], prefetcher: Prefetcher | None):
        self.model, self.prefetcher = model, prefetcher
        self.blocks = {b.name: b for b in blocks}
        for name, buf in resident.items():
            bind(self.blocks[name], buf)
        self.streamed = {b.name for b in blocks if b.name not in resident}
        if self.streamed and prefetcher is None:
            raise ValueError("streamed blocks need a prefetcher")
        self._handles = []
        if self.streamed:
            self._install(layers)

    def _install(self, layers: nn.ModuleList) -> None:
        last = len(layers) - 1
        hooks = [self.model.register_forward_pre_hook(lambda *_: self._enter("embed")),
                 self.model.register_forward_hook(lambda *_: self._leave("head"))]
        for i, layer in enumerate(layers):
            name = f"layers.{i}"
            hooks.append(layer.register_forward_pre_hook(
                lambda *_, n=name, first=(i == 0): self._layer_pre(n, first)))
            hooks.append(layer.register_forward_hook(
                lambda *_, n=name, final=(i == last): self._layer_post(n, final)))
        self._handles = hooks

    def _enter(self, name: str) -> None:
        if name in self.streamed:
            bind(self.blocks[name], self.prefetcher.acquire(name))

    def _leave(self, name: str) -> None:
        if name in self.streamed:
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
            if self.prefetcher is not None:
                self.prefetcher.reset()
            raise

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.prefetcher is not None:
            self.prefetcher.close()
