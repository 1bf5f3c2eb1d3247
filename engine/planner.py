"""Turn a byte budget into a committee size per MoE layer."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import BudgetTooSmallError


@dataclass(frozen=True)
class LayerShape:
    """What the planner needs to know of one MoE layer."""

    num_experts: int
    top_k: int
    expert_bytes: int


def minimum_bytes(layers: Sequence[LayerShape]) -> int:
    """What one token needs: its top-k experts resident in every MoE layer."""
    return sum(layer.top_k * layer.expert_bytes for layer in layers)


def plan_capacities(budget_bytes: int, layers: Sequence[LayerShape]) -> list[int]:
    """Committee sizes within ``budget_bytes``: top-k everywhere, then one slot at a time to the emptiest layer."""
    floor = minimum_bytes(layers)
    if budget_bytes < floor:
        raise BudgetTooSmallError(budget_bytes, floor)
    sizes = [layer.top_k for layer in layers]
    left = budget_bytes - floor
    heap = [(size / layer.num_experts, i) for i, (size, layer) in enumerate(zip(sizes, layers))]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        if sizes[i] >= layer.num_experts or layer.expert_bytes > left:
            continue
        sizes[i] += 1
        left -= layer.expert_bytes
        heapq.heappush(heap, (sizes[i] / layer.num_experts, i))
    return sizes
