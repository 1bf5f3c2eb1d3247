"""The planner spends the budget in whole experts, never more, at least top-k per layer."""

from __future__ import annotations

import pytest
import torch

from expertswap.engine.observe.counters import Counters, RoutingCounts, totals
from expertswap.protocol import POLICIES, BudgetTooSmallError, LayerShape, PolicyError, minimum_bytes, plan_capacities

LAYERS = [LayerShape(8, 2, 100), LayerShape(8, 2, 100), LayerShape(16, 4, 50)]


def test_minimum_is_top_k_everywhere() -> None:
    assert minimum_bytes(LAYERS) == 2 * 100 + 2 * 100 + 4 * 50
    assert plan_capacities(600, LAYERS) == [2, 2, 4]
    with pytest.raises(BudgetTooSmallError):
        plan_capacities(599, LAYERS)


@pytest.mark.parametrize("budget", [600, 777, 1000, 1500, 2399, 2400, 10**9])
def test_never_over_budget_and_fills_evenly(budget: int) -> None:
    sizes = plan_capacities(budget, LAYERS)
    used = sum(s * layer.expert_bytes for s, layer in zip(sizes, LAYERS, strict=True))
    assert used <= budget
    assert all(layer.top_k <= s <= layer.num_experts for s, layer in zip(sizes, LAYERS, strict=True))
    # nothing more fits: every layer is full or its next expert is over what is left
    assert all(
        s == layer.num_experts or used + layer.expert_bytes > budget for s, layer in zip(sizes, LAYERS, strict=True)
    )
    shares = [s / layer.num_experts for s, layer in zip(sizes, LAYERS, strict=True)]
    assert max(shares) - min(shares) <= 1 / 8 + 1e-9 or budget - used < 100


def test_full_budget_holds_everything() -> None:
    assert plan_capacities(2400, LAYERS) == [8, 8, 16]


def test_the_engine_publishes_its_committee_sizes_and_policies(tiny_model, open_engine) -> None:
    """What the front ends show comes from the engine: its planner's count and the policies it takes."""
    engine = open_engine(tiny_model("qwen3_moe"), budget="50%")
    committees = engine.committees
    assert engine.committee_size(engine.budget_bytes) == sum(c.capacity for c in committees)
    assert engine.total_experts == sum(c.num_experts for c in committees)
    assert engine.committee_size(engine.total_expert_bytes) == engine.total_experts
    assert engine.committee_size(0) == sum(c.top_k for c in committees)  # below the minimum: the minimum committee
    assert engine.policies == tuple(p for p in POLICIES if p != "cpu")  # cpu computes beside a GPU only
    with pytest.raises(PolicyError):
        engine.set_policy("cpu")


def test_routing_counts_are_named_views_of_one_device_tensor() -> None:
    counts = RoutingCounts(torch.device("cpu"))
    counts.misses += 3
    counts.hits += torch.tensor(2)
    assert counts.tensor.tolist() == [2, 3, 0, 0]
    assert totals(Counters(loads=1), [counts, counts]).misses == 6
