"""Token generation over an Engine: KV cache, greedy / sampling, batches with left padding."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = off
    top_p: float = 1.0            # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def sample(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """Next tokens ``[B]`` from last-position logits ``[B, V]``."""
    logits = logits.float()
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > s.top_p          # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def generate_steps(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                   sampling: Sampling, eos_ids: set[int], pad_id: int) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (``[B]``, CPU) each step.

    ``input_ids``/``attention_mask`` are left-padded ``[B, S]``. Sequences that hit an eos keep
    yielding ``pad_id``; the loop ends when all are done or after ``max_new_tokens``.
    """
    if max_new_tokens <= 0:
        return
    gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    takes_pos = "position_ids" in inspect.signature(engine.model.forward).parameters
    mask = attention_mask.to(engine.device)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)                     # [B, S]
    cache = engine.new_cache()
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long) if eos_ids else None
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = engine.forward(ids, mask, pos if takes_pos else None, cache, logits_to_keep=1)[:, -1]
        nxt = sample(logits, sampling, gen).cpu()
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        yield nxt
        if eos is not None:
            done |= torch.isin(nxt, eos)
        if bool(done.all()):
            return
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        pos = pos[:, -1:] + 1
