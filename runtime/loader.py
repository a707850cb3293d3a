"""From a checkpoint to blocks: the model skeleton on the meta device, cut into blocks.

The skeleton is transformers' own model class built with parameters on the meta device (buffers
such as rotary frequencies are real, they are tiny). Its parameters are grouped into blocks,
"embed", "layers.0" ... "layers.N-1", "head", following the architecture table; each block gets
a Layout, and ``pack_block`` reads just that block's tensors from the checkpoint into one buffer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from runtime.blocks import Layout, pack, plan_layout
from runtime.checkpoint import Checkpoint, CheckpointError
from runtime.models.arch import Arch, arch_for


@dataclass
class BlockDef:
    name: str                                   # "embed" | "layers.i" | "head"
    kind: str                                   # "embed" | "layer" | "head"
    params: list[tuple[str, nn.Module, str]]    # (full name, owning module, attribute)
    layout: Layout | None = None
    sources: dict[str, str] = field(default_factory=dict)   # full name -> checkpoint key

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes if self.layout else 0

    @property
    def numel(self) -> int:
        return sum(torch.Size(e.shape).numel() for e in self.layout.entries) if self.layout else 0


def build_skeleton(config, trust_remote_code: bool = False) -> tuple[nn.Module, Arch]:
    """transformers' model for ``config`` with meta parameters and real (CPU) buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    arch = arch_for(getattr(config, "model_type", "?"))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    return model, arch


def define_blocks(model: nn.Module, arch: Arch) -> list[BlockDef]:
    layers = model.get_submodule(arch.layers)
    embed = [p for p in arch.embed if _has_submodule(model, p)]
    blocks = [BlockDef("embed", "embed", [])]
    blocks += [BlockDef(f"layers.{i}", "layer", []) for i in range(len(layers))]
    head = BlockDef("head", "head", [])
    prefix = arch.layers + "."
    for name, _ in model.named_parameters(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        item = (name, model.get_submodule(owner_name), attr)
        if name.startswith(prefix):
            blocks[1 + int(name[len(prefix):].split(".")[0])].params.append(item)
        elif any(name.startswith(e + ".") for e in embed):
            blocks[0].params.append(item)
        else:
            head.params.append(item)
    return [b for b in blocks if b.params] + ([head] if head.params else [])


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not None
    except AttributeError:
        return False


def resolve_sources(model: nn.Module, blocks: list[BlockDef], ckpt: Checkpoint) -> None:
    """Map each parameter to its checkpoint key (prefix quirks, tied embeddings)."""
    keys = ckpt.keys()
    renamed = _legacy_names(model, keys)          # e.g. GPT-NeoX "embed_out." -> "lm_head."
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = tied if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False) else {}
    for b in blocks:
        for name, _, _ in b.params:
            cands = [name]
            if prefix and name.startswith(prefix + "."):
                cands.append(name[len(prefix) + 1:])
            elif prefix:
                cands.append(f"{prefix}.{name}")
            if name in tied:
                cands.append(tied[name])
                if prefix and tied[name].startswith(prefix + "."):
                    cands.append(tied[name][len(prefix) + 1:])
            key = next((c for c in cands if c in keys), None) or next(
                (renamed[c] for c in cands if c in renamed), None)
            if key is None:
                raise CheckpointError(f"weight {name!r} is missing from the checkpoint at {ckpt.root}")
            b.sources[name] = key


def _legacy_names(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """Checkpoint keys under transformers' own renaming rules: {new name: checkpoint key}."""
    import re
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        rules = [r for r in get_model_conversion_mapping(model) if type(r).__name__ == "WeightRenaming"]
    except Exception:           # older/newer transformers without this API: plain names only
        return {}
    out = {}
    for r in rules:
        for src, tgt in zip(r.source_patterns, r.target_patterns):
            for k in keys:
                new = re.sub(src, tgt, k)
                if new != k:
                    out[new] = k
    return out


def assign_layouts(model: nn.Module, blocks: list[BlockDef], dtype: torch.dtype) -> None:
    """Layouts from the skeleton's shapes; floating tensors are stored in ``dtype``."""
    for b in blocks:
        specs = []
        for name, module, attr in b.params:
            p = getattr(module, attr)
            specs.append((name, dtype if p.dtype.is_floating_point else p.dtype, tuple(p.shape)))
        b.layout = plan_layout(specs)


def pack_block(ckpt: Checkpoint, block: BlockDef, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one block's tensors from the checkpoint into one aligned uint8 buffer (CPU)."""
    tensors = {}
    for name, _, _ in block.params:
        t = ckpt.get(block.sources[name])
        expected = next(e.shape for e in block.layout.entries if e.name == name)
        if tuple(t.shape) != expected:
            raise CheckpointError(
                f"weight {block.sources[name]!r} in {ckpt.root} has shape {tuple(t.shape)}, "
                f"the model config expects {expected}")
        tensors[name] = t
    return pack(tensors, block.layout, out)


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Skeleton buffers (rotary tables, masks) onto the compute device."""
    for module in model.modules():
        for k, buf in module._buffers.items():
            if buf is not None and buf.device != device and buf.device.type != "meta":
                module._buffers[k] = buf.to(device)
