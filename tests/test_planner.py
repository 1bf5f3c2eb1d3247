"""The planner spends the budget in whole experts, never more, at least top-k per layer."""

from __future__ import annotations

import pytest

from expertswap.engine import BudgetTooSmallError
from expertswap.engine.planner import LayerShape, minimum_bytes, plan_capacities

LAYERS = [LayerShape(8, 2, 100), LayerShape(8, 2, 100), LayerShape(16, 4, 50)]


def test_minimum_is_top_k_everywhere() -> None:
    assert minimum_bytes(LAYERS) == 2 * 100 + 2 * 100 + 4 * 50
    assert plan_capacities(600, LAYERS) == [2, 2, 4]
    with pytest.raises(BudgetTooSmallError):
        plan_capacities(599, LAYERS)


@pytest.mark.parametrize("budget", [600, 777, 1000, 1500, 2399, 2400, 10**9])
def test_never_over_budget_and_fills_evenly(budget: int) -> None:
    sizes = plan_capacities(budget, LAYERS)
    used = sum(s * layer.expert_bytes for s, layer in zip(sizes, LAYERS))
    assert used <= budget
    assert all(layer.top_k <= s <= layer.num_experts for s, layer in zip(sizes, LAYERS))
    # nothing more fits: every layer is full or its next expert is over what is left
    assert all(s == layer.num_experts or used + layer.expert_bytes > budget for s, layer in zip(sizes, LAYERS))
    shares = [s / layer.num_experts for s, layer in zip(sizes, LAYERS)]
    assert max(shares) - min(shares) <= 1 / 8 + 1e-9 or budget - used < 100


def test_full_budget_holds_everything() -> None:
    assert plan_capacities(2400, LAYERS) == [8, 8, 16]
