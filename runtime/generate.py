"""Token generation over an Engine: KV cache, greedy / sampling, batches with left padding."""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


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


def _is_count(n) -> bool:
    if isinstance(n, bool):
        return False
    try:
        return operator.index(n) >= 0
    except TypeError:
        return False


def position_limit(model: nn.Module) -> int | None:
    """Longest sequence a model with a learned position table can run; None when not bounded
    (rotary / ALiBi models only degrade past ``max_position_embeddings``, they do not fail)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    tokens = model.get_input_embeddings()
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not tokens]
    return limit if tables and limit else None


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


def _check_kv_budget(engine, batch: int, length: int) -> None:
    """The KV cache must stay inside what the planner reserved (batch_size x max_context tokens)."""
    wl = getattr(getattr(engine, "placement", None), "workload", None)
    if wl is not None and batch * length > wl.batch * wl.context:
        raise ValueError(
            f"this request needs a KV cache for {batch} x {length} tokens, but the plan reserved "
            f"{wl.batch} x {wl.context} (batch_size x max_context): load the model with a larger "
            "max_context or batch_size, or ask for fewer tokens")


def engine_steps(engine, *args) -> Iterator[torch.Tensor]:
    """The decode loop of ``engine``: its own when it has one (a pipeline re-runs failed
    requests), else ``generate_steps``; same arguments and tokens."""
    own = getattr(engine, "generate_steps", None)
    return own(*args) if own is not None else generate_steps(engine, *args)


def generate_steps(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                   sampling: Sampling, eos_ids: set[int], pad_id: int) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (``[B]``, CPU) each step.

    ``input_ids``/``attention_mask`` are left-padded ``[B, S]``. Sequences that hit an eos keep
    yielding ``pad_id``; the loop ends when all are done or after ``max_new_tokens``.
    """
    if not _is_count(max_new_tokens):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"empty prompt: input_ids must be [batch, tokens] with at least one token, "
                         f"got shape {tuple(input_ids.shape)}")
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"empty prompt: row(s) {empty} of the batch have no tokens to continue from")
    limit, longest = position_limit(engine.model), int(attention_mask.sum(-1).max())
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{longest + max_new_tokens} exceeds the {limit} positions this model has "
                         "(max_position_embeddings): shorten the prompt or ask for fewer tokens")
    _check_kv_budget(engine, input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
    if max_new_tokens == 0:
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
