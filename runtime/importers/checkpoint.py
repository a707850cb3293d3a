"""ImportedCheckpoint: a GPTQ / AWQ / bitsandbytes safetensors checkpoint seen as an exa one.

The engine asks for ``owner.qweight``, ``owner.scales`` ... of each quantized linear; the first
such request converts that linear (reading only its source tensors) and keeps the result until
another linear is asked for, so memory holds one converted linear at a time. Every other tensor
(norms, embeddings, biases, unquantized linears) passes through unchanged.
"""
from __future__ import annotations

from collections import OrderedDict
from types import ModuleType

import torch

from runtime.checkpoint import Checkpoint, CheckpointError
from runtime.quant import module_for
from runtime.quant.spec import QuantSpec


def _packed_names(spec: QuantSpec) -> list[str]:
    g = 64 if spec.group_size == -1 else spec.group_size
    names = list(module_for(spec).packed_shapes(spec, 2, 8 * g))
    return names + (["perm"] if spec.act_order else [])


class ImportedCheckpoint(Checkpoint):
    """``base`` (a plain safetensors Checkpoint) whose quantized linears read as exa packed tensors.

    Args:
        base: the source checkpoint (config, shards).
        importer: the format module (``runtime.importers.gptq`` / ``awq`` / ``bnb``).
        qcfg: the ``quantization_config`` dict of config.json.
    """

    def __init__(self, base: Checkpoint, importer: ModuleType, qcfg: dict):
        super().__init__(base.config, base._files, base.root, base.tokenizer_kwargs)
        self.generation_config = base.generation_config
        self.importer, self.qcfg, self.base = importer, qcfg, base
        src = base.keys()
        self._owners = importer.owners(src)
        if not self._owners:
            raise CheckpointError(f"{base.root}: config.json says {qcfg.get('quant_method')!r} but no "
                                  "quantized linear layers were found in the weights")
        self._roles = {o: importer.roles(o, src) for o in self._owners}
        try:
            first = self._roles[self._owners[0]]        # some formats keep settings per tensor
            self._spec = importer.model_spec(qcfg, lambda role: base.get(first[role]))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{base.root}: unsupported {qcfg.get('quant_method')} checkpoint: {e}") from e
        consumed = {k for r in self._roles.values() for k in r.values()}
        names = _packed_names(self._spec)
        self._exa_keys = {f"{o}.{n}": (o, n) for o in self._owners for n in names}
        self._keys = (src - consumed) | set(self._exa_keys)
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.skip_modules = self._skip_list()

    @property
    def quant(self) -> QuantSpec:
        """The exa spec of every imported linear."""
        return self._spec

    def _skip_list(self) -> list[str]:
        """Linear layers of the model that the checkpoint does not quantize (exact names)."""
        from runtime.importers import linear_names
        from runtime.loader import build_skeleton
        model, _ = build_skeleton(self.config)
        prefix = getattr(model, "base_model_prefix", "") or ""
        owned = set(self._owners)

        def quantized(n: str) -> bool:
            alt = n[len(prefix) + 1:] if prefix and n.startswith(prefix + ".") else f"{prefix}.{n}"
            return n in owned or alt in owned
        return [n for n in linear_names(model) if not quantized(n)]

    def keys(self) -> set[str]:
        return set(self._keys)

    def get(self, name: str) -> torch.Tensor:
        hit = self._exa_keys.get(name)
        if hit is None:
            return self.base.get(name)
        owner, part = hit
        return self.converted(owner)[part]

    def converted(self, owner: str) -> dict[str, torch.Tensor]:
        """exa packed tensors of one quantized linear (converted on first use, small LRU)."""
        if owner not in self._cache:
            t = {role: self.base.get(key) for role, key in self._roles[owner].items()}
            try:
                spec, packed = self.importer.convert(t, self.qcfg, owner)
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{self.root}: cannot import {owner}: {e}") from e
            if spec != self._spec:
                raise CheckpointError(f"{self.root}: {owner} converts to {spec.name}, the model to {self._spec.name}")
            self._cache[owner] = packed
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[owner]

    def close(self) -> None:
        self._cache.clear()
        self.base.close()

    def fingerprint(self) -> str:
        return self.base.fingerprint()
