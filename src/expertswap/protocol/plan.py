"""Turn a byte budget into a committee size per MoE layer: the one function both sides of the wire use.

The engine applies it (with each layer's demand); the app labels its slider with it, for a local engine and, from
the layer shapes the server publishes, for a remote one.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from expertswap.protocol.errors import BudgetTooSmallError


@dataclass(frozen=True)
class LayerShape:
    """What the planner needs to know of one MoE layer."""

    num_experts: int
    top_k: int
    expert_bytes: int


def minimum_bytes(layers: Sequence[LayerShape]) -> int:
    """What one token needs: its top-k experts resident in every MoE layer."""
    return sum(layer.top_k * layer.expert_bytes for layer in layers)


def plan_capacities(
    budget_bytes: int, layers: Sequence[LayerShape], demand: Sequence[float] | None = None
) -> list[int]:
    """Committee sizes within ``budget_bytes``: top-k everywhere, then one slot at a time where it is scarcest.

    ``demand`` is how many experts each layer effectively uses (see ``effective_experts``); a slot
    goes to the layer with the fewest slots per unit of demand. Without it every expert counts.
    """
    floor = minimum_bytes(layers)
    if budget_bytes < floor:
        raise BudgetTooSmallError(budget_bytes, floor)
    sizes = [layer.top_k for layer in layers]
    left = budget_bytes - floor
    want = list(demand) if demand is not None else [float(layer.num_experts) for layer in layers]
    heap = [(size / want[i], i) for i, size in enumerate(sizes)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        layer = layers[i]
        if sizes[i] >= layer.num_experts or layer.expert_bytes > left:
            continue
        sizes[i] += 1
        left -= layer.expert_bytes
        heapq.heappush(heap, (sizes[i] / want[i], i))
    return sizes


def committee_size(budget_bytes: int, layers: Sequence[LayerShape]) -> int:
    """Experts resident in all layers together at ``budget_bytes`` (the minimum committee below the minimum).

    Demand moves slots between layers, not their number: the total is the same with or without it.
    """
    return sum(plan_capacities(max(budget_bytes, minimum_bytes(layers)), layers))
