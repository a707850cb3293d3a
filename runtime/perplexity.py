"""Perplexity with a sliding window (each token scored once, with up to ``max_length`` context)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def sliding_nll(forward, ids: torch.Tensor, max_length: int = 1024, stride: int = 512,
                progress: bool = True) -> tuple[float, int]:
    """Total negative log-likelihood and number of scored tokens of ``ids`` ``[T]``.

    ``forward(input_ids [1, L]) -> logits [1, L, V]``. Windows start every ``stride`` tokens; a
    window scores only the tokens no earlier window scored, so every token after the first is
    scored exactly once.
    """
    if stride <= 0 or max_length <= 1 or stride > max_length:
        raise ValueError(f"need 0 < stride <= max_length and max_length > 1, got stride={stride}, "
                         f"max_length={max_length}")
    total, count, scored_to = 0.0, 0, 1         # token 0 has nothing to be predicted from
    T = ids.numel()
    starts = list(range(0, max(T - 1, 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + max_length, T)
        window = ids[begin:end][None]                               # [1, L]
        logits = forward(window)[0].float()                         # [L, V]
        first = max(scored_to, begin + 1)                           # first target position to score
        if first < end:
            pred = logits[first - begin - 1:end - begin - 1]        # rows predicting targets first..end-1
            target = window[0, first - begin:end - begin].to(pred.device)
            total += float(F.cross_entropy(pred, target, reduction="sum"))
            count += end - first
            scored_to = end
        if end == T:
            break
    return total, count


def perplexity_from_nll(total: float, count: int) -> float:
    return math.exp(total / count) if count else float("nan")
