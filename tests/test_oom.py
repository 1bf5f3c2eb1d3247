"""Out of memory mid-reply: shrink the budget, roll the step back, retry the token; typed error at the minimum."""

from __future__ import annotations

import pytest
import torch

from expertswap.engine import Engine
from expertswap.protocol import BudgetChange, MemorySample, OutOfMemoryError, SamplingSettings, TokenStats

IDS = [3, 14, 15, 9, 2, 6]
SETTINGS = SamplingSettings(max_new_tokens=10)


def _fail_calls(engine: Engine, calls: set[int], error: type[BaseException] = torch.OutOfMemoryError) -> list[int]:
    """Make the first committee's forward raise on the given call numbers (an allocator failure mid-step)."""
    committee = engine.committees[-1]  # the last MoE layer: earlier layers have written the KV cache already
    forward = committee.forward
    seen = [0]

    def failing(*args, **kwargs):
        seen[0] += 1
        if seen[0] in calls:
            raise error("injected: CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    committee.forward = failing
    return seen


@pytest.mark.parametrize("calls", [{1}, {4}, {4, 5}, {7}], ids=["prefill", "decode", "twice", "later"])
def test_oom_shrinks_and_retries_the_same_token(tiny_model, calls: set[int]) -> None:
    folder = tiny_model("qwen3_moe")
    with Engine.load(folder, budget="100%") as clean:
        expected = list(clean.generate(IDS, SETTINGS))
    with Engine.load(folder, budget="100%") as engine:
        events = engine.subscribe()
        before = engine.budget_bytes
        _fail_calls(engine, calls)
        tokens = list(engine.generate(IDS, SETTINGS))
        oom = [e for e in events.drain() if isinstance(e, BudgetChange) and e.applied and e.reason == "oom"]
    assert tokens == expected  # exact: the failed step was rolled back, not half-applied to the KV cache
    assert len(oom) == len(calls) and engine.budget_bytes < before
    minimum = engine.minimum_budget_bytes
    assert oom[0].new_bytes == minimum + (before - minimum) // 2  # half the headroom
    assert engine.resident_expert_bytes() <= engine.budget_bytes


def test_oom_at_the_minimum_is_a_typed_error(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="100%") as engine:
        _fail_calls(engine, set(range(1, 1000)), MemoryError)
        with pytest.raises(OutOfMemoryError, match="smallest budget"):
            list(engine.generate(IDS, SETTINGS))
        assert engine.budget_bytes == engine.minimum_budget_bytes


def test_a_short_reply_still_reports_memory_at_both_ends(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe")) as engine:
        events = engine.subscribe()
        list(engine.generate(IDS, SamplingSettings(max_new_tokens=2)))
        kinds = [type(e) for e in events.drain() if isinstance(e, (MemorySample, TokenStats))]
    assert kinds[0] is MemorySample and kinds[-1] is MemorySample and kinds.count(TokenStats) == 2
