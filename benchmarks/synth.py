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
