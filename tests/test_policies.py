"""Miss policies as pure functions on small tensors."""

from __future__ import annotations

import torch

from expertswap.engine.moe.policies import skip_routings, substitute_misses


def test_skip_drops_weak_routings_and_renormalises() -> None:
    index = torch.tensor([[4, 1, 7], [2, 3, 5]])
    weights = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2]])
    out_index, out_weights, dropped = skip_routings(index, weights, threshold=0.15)
    assert out_index.tolist() == [[4, 1, -1], [2, 3, 5]] and int(dropped) == 1
    torch.testing.assert_close(out_weights[0], torch.tensor([0.6, 0.3, 0.0]) / 0.9)
    assert torch.equal(out_weights[1], weights[1])  # nothing dropped: the very same weights


def test_skip_never_drops_a_tokens_strongest_routing() -> None:
    index = torch.tensor([[0, 1]])
    out_index, out_weights, dropped = skip_routings(index, torch.tensor([[0.55, 0.45]]), threshold=0.9)
    assert out_index.tolist() == [[0, -1]] and int(dropped) == 1
    torch.testing.assert_close(out_weights, torch.tensor([[1.0, 0.0]]))


def test_substitute_sends_each_miss_to_the_best_unused_resident_expert() -> None:
    is_resident = torch.tensor([True, False, True, False, True])
    index = torch.tensor([[1, 2], [3, 1], [0, 4]])
    resident = is_resident[index]
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.8, 0.3],   # 1 misses: 2 is taken by the token itself, so 4
                           [0.7, 0.2, 0.1, 0.9, 0.6],   # 3 and 1 miss: the best resident 0, then 4
                           [0.0, 0.0, 0.0, 0.0, 0.0]])  # all resident: unchanged
    out = substitute_misses(index, resident, scores, is_resident)
    assert out.tolist() == [[4, 2], [0, 4], [0, 4]]
    assert bool(is_resident[out].all())  # only resident experts are computed
    assert all(len(set(row)) == len(row) for row in out.tolist())  # no expert twice for one token
