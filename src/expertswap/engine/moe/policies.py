"""Miss policies as pure tensor functions: routing in, routing out, no module state, no host sync.

The committee decides when each applies (see ``Committee._forward``); these say what it does to
the router's choice, so they are tested with small tensors alone.
"""

from __future__ import annotations

import torch
from torch import nn


def skip_routings(index: torch.Tensor, weights: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PC-MoE skippable computation: drop routings below ``threshold``, never a token's strongest.

    Returns (index with dropped routings as -1, weights renormalised to the same sum per token, how
    many were dropped). A token that drops nothing keeps its weights bit for bit.
    """
    keep = (weights >= threshold) | (weights == weights.max(dim=1, keepdim=True).values)
    dropped = ~keep
    total = weights.sum(dim=1, keepdim=True)
    kept = (weights * keep).sum(dim=1, keepdim=True)
    renormalised = weights * keep * (total / kept)
    weights = torch.where(dropped.any(dim=1, keepdim=True), renormalised, weights)
    return index.masked_fill(dropped, -1), weights, dropped.sum()


def substitute_misses(index: torch.Tensor, resident: torch.Tensor, scores: torch.Tensor,
                      is_resident: torch.Tensor) -> torch.Tensor:
    """SwapMoE virtual experts: each missing routing goes to the best-scored resident expert not yet used.

    ``index`` [T, k] expert ids; ``resident`` [T, k] whether each routing's expert is resident;
    ``scores`` [T, E] how much the router (or importance) favours each expert; ``is_resident`` [E].
    """
    scores = scores.masked_fill(~is_resident, float("-inf"))
    taken = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, resident)
    out = index.clone()
    for k in range(index.shape[1]):
        miss = ~resident[:, k]
        choice = scores.masked_fill(taken, float("-inf")).argmax(dim=1)
        out[:, k] = torch.where(miss, choice, index[:, k])
        taken |= nn.functional.one_hot(choice, scores.shape[1]).bool() & miss[:, None]
    return out
