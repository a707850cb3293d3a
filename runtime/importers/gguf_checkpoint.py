"""GGUFNativeCheckpoint: a .gguf file's quantized linears read straight into exa's int format.

Tensor names are mapped to transformers' names with transformers' own GGUF name map, and the
rows of llama-family ``attn_q`` / ``attn_k`` are put back in transformers' order (llama.cpp's
converter interleaves the two rotary halves of every head; rows are independent in both
formats, so moving quantized rows is exact). The model's spec is the native exa spec of the most
common quantized type among its linear layers (see ``runtime.importers.gguf``); linears of
another type that fit that spec are converted too, all others (and every non-linear tensor)
are dequantized with gguf's own reference code and kept in float (exact), listed in
``skip_modules``. Each tensor is read (memory-mapped) only when the loader asks for it.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch

from runtime.checkpoint import Checkpoint, CheckpointError
from runtime.importers import gguf as fmt
from runtime.importers import linear_names
from runtime.quant.spec import QuantSpec

_PERMUTED = {"LlamaTensorProcessor"}            # processors whose only change is the q/k row order


def _name_map(model, arch: str) -> dict[str, str] | None:
    """{gguf name: HF name} from gguf's tensor name table, or None if a parameter is unmapped."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    key = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
    if key is None:
        return None
    table = get_tensor_name_map(key, model.config.num_hidden_layers)
    out = {}
    for hf in model.state_dict():
        base, _, suffix = hf.rpartition(".")
        g = table.get_name(base)
        if g is None:
            return None
        out[f"{g}.{suffix}"] = hf
    return out


class GGUFNativeCheckpoint(Checkpoint):
    """Lazy, natively quantized view of a .gguf file (llama-family architectures)."""

    def __init__(self, path: Path, config):
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        from runtime.loader import build_skeleton
        kw = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
        super().__init__(config, {}, path, kw)
        self.reader = gguf.GGUFReader(str(path))
        arch = str(bytes(self.reader.fields["general.architecture"].parts[-1]), "utf-8")
        proc_cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
        if proc_cls is not TensorProcessor and proc_cls.__name__ not in _PERMUTED:
            raise CheckpointError(f"{path}: native GGUF import does not handle architecture {arch!r} "
                                  f"({proc_cls.__name__} rewrites tensors); open it without gguf_native")
        self._permute = proc_cls.__name__ in _PERMUTED
        model, _ = build_skeleton(config)
        name_map = _name_map(model, arch)
        if name_map is None:                     # slower, but handles every naming quirk
            name_map = get_gguf_hf_weights_map(model, proc_cls(config=config.to_dict()))
        self._tensors_by_hf = {name_map[t.name]: t for t in self.reader.tensors if t.name in name_map}
        linears = set(linear_names(model))
        qtypes = {n[: -len(".weight")]: t.tensor_type.name for n, t in self._tensors_by_hf.items()
                  if n.endswith(".weight") and n[: -len(".weight")] in linears}
        common = Counter(v for v in qtypes.values() if v in fmt.NATIVE).most_common(1)
        self._spec: QuantSpec | None = fmt.NATIVE[common[0][0]] if common else None
        self._owners = {o: ty for o, ty in qtypes.items()
                        if self._spec is not None and fmt.convertible(ty, self._spec)}
        self.skip_modules = sorted(linears - set(self._owners))
        packed = ["qweight", "scales"] + ([] if self._spec is None or self._spec.sym else ["mins"])
        self._keys = {n for n in self._tensors_by_hf if n[: -len(".weight")] not in self._owners
                      or not n.endswith(".weight")}
        self._keys |= {f"{o}.{p}" for o in self._owners for p in packed}
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.inexact: list[str] = []                 # linears whose scales had to be rounded

    @property
    def quant(self) -> QuantSpec | None:
        """exa spec of the converted linears (None when no linear has a supported type)."""
        return self._spec

    def keys(self) -> set[str]:
        return set(self._keys)

    def _rows(self, hf_name: str, t) -> np.ndarray:
        """The tensor's rows ([N, row bytes] or [N, K] floats), q/k rows back in HF order."""
        data = t.data
        if self._permute and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = (self.config.num_attention_heads if ".q_proj." in hf_name
                     else getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads)
            n = data.shape[0]
            idx = np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(-1)
            data = data[idx]
        return data

    def get(self, name: str) -> torch.Tensor:
        owner, _, part = name.rpartition(".")
        if owner in self._owners and part in ("qweight", "scales", "mins"):
            return self.converted(owner)[part]
        t = self._tensors_by_hf.get(name)
        if t is None:
            raise KeyError(name)
        data = self._rows(name, t)
        if t.tensor_type.name in ("F32", "F16"):
            w = np.asarray(data, dtype=np.float32)
        else:
            from gguf.quants import dequantize
            w = dequantize(np.asarray(data), t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        return torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True)).reshape(shape)

    def converted(self, owner: str) -> dict[str, torch.Tensor]:
        """exa packed tensors of one linear (converted on first use; small LRU)."""
        if owner not in self._cache:
            t = self._tensors_by_hf[owner + ".weight"]
            K = int(t.shape[0])
            try:
                packed, exact = fmt.convert(fmt.raw_rows(self._rows(owner + ".weight", t)),
                                            t.tensor_type.name, self._spec, K)
            except ValueError as e:
                raise CheckpointError(f"{self.root}: tensor {t.name}: {e}") from e
            if not exact and owner not in self.inexact:
                self.inexact.append(owner)
                warnings.warn(f"{self.root.name}: {t.name} ({t.tensor_type.name}) scales are not float16 "
                              f"numbers; rounded to the nearest (relative error <= 2**-11)", stacklevel=2)
            self._cache[owner] = packed
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[owner]

    def close(self) -> None:
        self._cache.clear()

    def fingerprint(self) -> str:
        st = self.root.stat()
        return hashlib.sha256(f"{self.root}:{st.st_size}:{st.st_mtime_ns}:native".encode()).hexdigest()[:16]
