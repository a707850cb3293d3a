"""Architectures as data.

Exa reuses transformers' own module classes for every architecture; all an architecture needs
here is where its decoder layers live and which top-level modules run *before* them (the
"embed" block). Everything else outside the layers (final norm, lm_head, projections) forms the
"head" block. Adding an architecture is adding one row.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    layers: str                      # dotted path of the nn.ModuleList of decoder layers
    embed: tuple[str, ...]           # modules run before layer 0 (token/position embeddings)


_LLAMA_LIKE = Arch(layers="model.layers", embed=("model.embed_tokens",))

ARCHS: dict[str, Arch] = {
    **{name: _LLAMA_LIKE for name in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi",
        "starcoder2", "olmo2", "stablelm", "granite", "cohere", "mixtral", "qwen3_moe",
    )},
    "gpt2": Arch(layers="transformer.h", embed=("transformer.wte", "transformer.wpe")),
    "falcon": Arch(layers="transformer.h", embed=("transformer.word_embeddings",)),
    "opt": Arch(layers="model.decoder.layers",
                embed=("model.decoder.embed_tokens", "model.decoder.embed_positions",
                       "model.decoder.project_in")),
    "gpt_neox": Arch(layers="gpt_neox.layers", embed=("gpt_neox.embed_in",)),
}


class UnsupportedArchitecture(ValueError):
    pass


def arch_for(model_type: str) -> Arch:
    """The Arch row for a config's ``model_type``; a clear error naming it when unknown."""
    try:
        return ARCHS[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHS))
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: Exa knows {known}. "
            "Add a row to runtime/models/arch.py if it is a standard decoder-only model."
        ) from None
