"""How many experts a layer's routing is spread over: what the planner divides the slots by."""

from __future__ import annotations

import math

import torch


def effective_experts(scores: torch.Tensor, top_k: int) -> float:
    """exp(entropy) of a layer's importance: how many experts its routing is spread over (>= top_k)."""
    total = float(scores.sum())
    if total <= 0:
        return float(scores.numel())
    p = scores.double() / total
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    return max(float(top_k), math.exp(entropy))
