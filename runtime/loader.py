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
    # quantized on the fly: module name -> (checkpoint key of its float weight, spec, transposed)
    derived: dict[str, tuple[str, object, bool]] = field(default_factory=dict)

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


def quantize_skeleton(model: nn.Module, spec, skip=("lm_head",)) -> dict[str, tuple[nn.Module, bool]]:
    """Swap the skeleton's linear layers for QuantLinear (meta); {module name: (module, transposed)}."""
    from runtime.quant.linear import swap_linears
    return swap_linears(model, spec, skip=tuple(skip), device="meta")


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


def resolve_sources(model: nn.Module, blocks: list[BlockDef], ckpt: Checkpoint,
                    qmods: dict[str, tuple[nn.Module, bool]] | None = None) -> None:
    """Map each parameter to its checkpoint key (prefix quirks, renames, tied embeddings).

    A QuantLinear's packed tensors come straight from the checkpoint when it has them (an exa
    quantized checkpoint); otherwise they are derived from the float weight, quantized at load.
    """
    find = _key_finder(model, ckpt)
    qmods = qmods or {}
    for b in blocks:
        for name, _, attr in b.params:
            owner = name.rpartition(".")[0]
            key = find(name)
            if key is None and owner in qmods and attr != "bias":
                wkey = find(f"{owner}.weight")
                if wkey is not None:
                    module, transposed = qmods[owner]
                    b.derived[owner] = (wkey, module.spec, transposed)
                    continue
            if key is None:
                raise CheckpointError(f"weight {name!r} is missing from the checkpoint at {ckpt.root}")
            b.sources[name] = key


def _key_finder(model: nn.Module, ckpt: Checkpoint):
    keys = ckpt.keys()
    renamed = _legacy_names(model, keys)          # e.g. GPT-NeoX "embed_out." -> "lm_head."
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    tied = tied if isinstance(tied, dict) and getattr(model.config, "tie_word_embeddings", False) else {}

    def find(name: str) -> str | None:
        cands = [name]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1:])
        elif prefix:
            cands.append(f"{prefix}.{name}")
        if name in tied:
            cands.append(tied[name])
            if prefix and tied[name].startswith(prefix + "."):
                cands.append(tied[name][len(prefix) + 1:])
        return next((c for c in cands if c in keys), None) or next(
            (renamed[c] for c in cands if c in renamed), None)
    return find


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
    """Layouts from the skeleton's shapes; floating weights are stored in ``dtype``.

    A quantized layer's packed tensors (codes, scales, absmax...) keep the dtype their format
    defines; its bias is a plain weight.
    """
    for b in blocks:
        specs = []
        for name, module, attr in b.params:
            p = getattr(module, attr)
            packed = hasattr(module, "spec") and attr != "bias"
            keep = packed or not p.dtype.is_floating_point
            specs.append((name, p.dtype if keep else dtype, tuple(p.shape)))
        b.layout = plan_layout(specs)


def _quantize_weight(ckpt: Checkpoint, owner: str, wkey: str, spec, transposed: bool, on_quantized):
    """RTN-quantize one float weight from the checkpoint: {owner.packed_name: tensor}."""
    from runtime.quant import module_for
    w = ckpt.get(wkey)
    w = (w.t() if transposed else w)
    dev = "cuda" if torch.cuda.is_available() else "cpu"        # RTN is ~100x faster on a GPU
    w = w.to(dev, non_blocking=True).float().contiguous()       # [N, K]
    packed = {k: v.cpu() for k, v in module_for(spec).quantize(w, spec).items()}
    if on_quantized is not None:
        on_quantized(owner, w, packed, spec)
    return {f"{owner}.{k}": v for k, v in packed.items()}


def pack_block(ckpt: Checkpoint, block: BlockDef, out: torch.Tensor | None = None,
               on_quantized=None) -> torch.Tensor:
    """Read one block's tensors from the checkpoint into one aligned uint8 buffer (CPU)."""
    tensors = {}
    for owner, (wkey, spec, transposed) in block.derived.items():
        tensors.update(_quantize_weight(ckpt, owner, wkey, spec, transposed, on_quantized))
    for name, _, _ in block.params:
        if name in tensors:
            continue
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
