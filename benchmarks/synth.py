"""Random-weight checkpoints of real model shapes, written block by block (never the whole model).

Values are drawn on the GPU when there is one (the host's CPU is ~100x slower at it), one decoder
layer at a time, and saved as one safetensors shard per layer with an index, like a real
sharded Hugging Face checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def llama_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**kw)


LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)


def write_random_checkpoint(path: str | Path, config, dtype=torch.bfloat16, std: float = 0.02,
                            device: str | None = None) -> Path:
    """Save ``config``'s model with N(0, std) weights (norms = 1) as per-layer shards; reuses a complete one."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[str, dict[str, tuple]] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else "outer"
        groups.setdefault(group, {})[name] = tuple(p.shape)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for group, shapes in sorted(groups.items()):
        shard = f"{group}.safetensors"
        tensors = {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=dtype)
            else:
                tensors[name] = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
                                 .mul_(std).to(dtype).cpu())
            weight_map[name] = shard
        tmp = path / (shard + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, path / shard)
    config.save_pretrained(path)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.replace(tmp, index)
    return path


class _RandomFloat:
    """A stand-in checkpoint whose every float tensor is drawn when asked (norms = 1).

    ``get`` hands the linears' weights out on the GPU when there is one, where ``pack_block``
    quantizes them; everything else comes back on the CPU. One tensor exists at a time.
    """

    def __init__(self, config, device: str, std: float, seed: int = 0):
        from runtime.loader import build_skeleton
        model, _ = build_skeleton(config)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.config, self.root, self.std, self.device = config, Path("<random>"), std, device
        self.tokenizer_kwargs = {}
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def keys(self) -> set[str]:
        return set(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        w = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32).mul_(self.std)
        return w if name.endswith("proj.weight") else w.to(torch.bfloat16).cpu()

    def close(self) -> None:
        pass


def write_random_quantized(path: str | Path, config, quant: str = "int4", group_size: int | None = 128,
                           std: float = 0.02, device: str | None = None, progress: bool = True) -> Path:
    """An exa checkpoint of ``config``'s shape with random weights, quantized block by block.

    Each decoder layer's float weights are drawn (on the GPU when there is one), RTN-quantized
    and written as one aligned shard before the next layer is drawn: the float model never
    exists, only one layer of it. Reuses a complete checkpoint already at ``path``.
    """
    from tqdm.auto import tqdm

    from runtime.loader import (
        assign_layouts,
        build_skeleton,
        define_blocks,
        pack_block,
        quantize_skeleton,
        resolve_sources,
    )
    from runtime.qcheckpoint import is_exa_checkpoint, write_checkpoint
    from runtime.quant.spec import spec_from_name
    path = Path(path)
    if is_exa_checkpoint(path):
        return path
    spec = spec_from_name(quant, group_size=group_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    src = _RandomFloat(config, device, std)
    model, arch = build_skeleton(config)
    qmods = quantize_skeleton(model, spec, ["lm_head"])
    blocks = define_blocks(model, arch)
    resolve_sources(model, blocks, src, qmods)
    assign_layouts(model, blocks, torch.bfloat16)
    bar = tqdm(blocks, desc=f"writing random {spec.name} checkpoint", unit="block", disable=not progress)
    return write_checkpoint(path, bar, lambda b: pack_block(src, b), config=config, tokenizer_dir=None,
                            quant=spec.to_json(), skip_modules=["lm_head"], dtype=torch.bfloat16,
                            metadata={"synthetic": f"random N(0, {std}) weights, RTN {spec.name}"},
                            writers=8, durable=False)
