"""How long the host takes to *issue* one decoder layer's eager kernels at one token.

Eager decode launches ~50 small kernels per layer (norms, rotary, attention, linears); at
batch 1 a resident layer's GPU work is a fraction of a millisecond, but the Python/ATen side
that launches it costs ~1 ms per layer on a typical host (measured: a 70B-shaped int4 model,
all 80 layers resident on an H100, 86 ms per token while its weights take 13 ms to read from
HBM). The cost model needs that number: the host issues ahead of the GPU, so a step costs
``max(transfer, device compute, issue)``. Measured on cuda only: on a CPU device the same
thread computes, and the op overhead is part of the measured CPU rates.

Measured with transformers' own Llama decoder layer at tiny sizes (its GPU time is far below
its issue time), one token, no cache: the per-layer time of a loop of them, synchronised only
at the end. The real layers of a model also launch quantized-matmul kernels (Triton's launcher
costs a little more than cuBLAS's), so this is a slight underestimate. Returns 0.0 (not
measured) when the layer cannot be built or the device is not cuda.
"""
from __future__ import annotations

import inspect
import time

import torch

__all__ = ["layer_issue_s"]


def layer_issue_s(device: str | torch.device, calls: int = 60) -> float:
    """Seconds per eager decoder-layer call at one token on ``device`` (0.0 when unavailable)."""
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    except Exception:  # noqa: BLE001 - an older or trimmed transformers
        return 0.0
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    dtype = torch.bfloat16
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=128, head_dim=64)
    cfg._attn_implementation = "sdpa"
    try:
        layer = LlamaDecoderLayer(cfg, 0).to(device=device, dtype=dtype).eval()
        x = torch.randn(1, 1, cfg.hidden_size, device=device, dtype=dtype)
        pos = torch.zeros(1, 1, dtype=torch.long, device=device)
        cos, sin = LlamaRotaryEmbedding(cfg).to(device)(x, pos)
        kw = {"position_embeddings": (cos, sin)}
        if "position_ids" in inspect.signature(layer.forward).parameters:
            kw["position_ids"] = pos

        def run(n: int) -> None:
            with torch.no_grad():
                for _ in range(n):
                    layer(x, **kw)
            torch.cuda.synchronize(device)
        run(5)                                          # warm-up: kernels loaded, caches filled
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            run(calls)
            best = min(best, (time.perf_counter() - t0) / calls)
        return best
    except Exception:  # noqa: BLE001 - a probe must never stop inference
        return 0.0
