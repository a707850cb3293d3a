"""Tiny random models of every supported architecture, saved like real checkpoints.

Each model is saved with ``save_pretrained`` as *sharded* safetensors (with an index) plus a
small byte-level tokenizer, so the whole loading path (index, shards, tied weights, tokenizer)
is exercised. Weights are random but fixed by a seed.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 261          # 256 byte tokens + 5 specials

_COMMON = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
_LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

CONFIGS: dict[str, dict] = {
    "llama": {**_LLAMA},
    "mistral": {**_LLAMA, "sliding_window": None},
    "qwen2": {**_LLAMA},
    "qwen3": {**_LLAMA, "head_dim": 16},
    "gemma": {**_LLAMA, "head_dim": 16},
    "gemma2": {**_LLAMA, "head_dim": 16, "sliding_window": 8},
    "phi3": {**_LLAMA},
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=256),
    "opt": dict(hidden_size=64, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4,
                word_embed_proj_dim=64, max_position_embeddings=256),
    "gpt_neox": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=256, rotary_pct=0.5),
}


def make_config(model_type: str, **overrides):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type, **{**_COMMON, **CONFIGS[model_type], **overrides})


def save_tokenizer(path: Path) -> None:
    """A byte-level tokenizer: every byte is a token, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i, special in enumerate(["<s>", "</s>", "<pad>", "<unk>", "<x>"]):
        vocab[special] = 256 + i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(path)


def save_tiny(model_type: str, path: Path, seed: int = 0, shard: str = "60KB", **overrides) -> Path:
    """Save a random tiny ``model_type`` model (fp32, sharded safetensors + tokenizer) at ``path``."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(model_type, **overrides))
    with torch.no_grad():                 # fresh random values everywhere (norms too), never zeros
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3).add_(1.0 if p.dim() == 1 else 0.0)
    model.save_pretrained(path, max_shard_size=shard)
    save_tokenizer(path)
    return path


def reference(path: Path):
    """transformers' own model loaded from ``path`` (fp32, CPU), for comparisons."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
