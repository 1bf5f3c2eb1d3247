"""The slot map on its own (no weights): both directions and the count agree after any sequence of changes."""

from __future__ import annotations

import random

import pytest
import torch

from expertswap.engine.moe.slot_map import SlotMap


def _check(slots: SlotMap) -> None:
    held = slots.slot_to_expert
    assert sorted(e for e in held if e >= 0) == sorted(slots.resident_experts)
    assert len(set(slots.resident_experts)) == len(slots.resident_experts)  # an expert sits in one slot at most
    for expert in range(slots.num_experts):
        slot = slots.slot_of(expert)
        assert (slot >= 0) == slots.is_resident(expert)
        assert slot < 0 or held[slot] == expert
    assert slots.full == (len(slots.resident_experts) == slots.num_experts)
    slots.publish()
    assert slots.device_map.tolist() == [slots.slot_of(e) for e in range(slots.num_experts)]


def test_random_installs_and_reshapes_keep_the_map_consistent() -> None:
    rng = random.Random(7)
    slots = SlotMap(num_experts=16, capacity=4)
    for _ in range(2000):
        if rng.random() < 0.1:
            capacity = rng.randint(1, 16)
            kept = rng.sample(range(slots.capacity), min(capacity, slots.capacity, rng.randint(0, capacity)))
            before = [slots.slot_to_expert[s] for s in kept]
            slots.reshape(kept, capacity)
            assert slots.slot_to_expert[: len(kept)] == before and slots.capacity == capacity
        else:
            outside = [e for e in range(16) if not slots.is_resident(e)]
            if outside:
                slot = rng.randrange(slots.capacity)
                old = slots.slot_to_expert[slot]
                assert slots.install(slot, rng.choice(outside)) == old
        _check(slots)


def test_an_expert_cannot_sit_in_two_slots() -> None:
    slots = SlotMap(num_experts=4, capacity=2)
    slots.install(0, 3)
    with pytest.raises(ValueError, match="already sits"):
        slots.install(1, 3)
    assert slots.install(0, 3) == 3  # the same place again is a no-op
    with pytest.raises(ValueError):
        slots.reshape([0, 1, 0], 2)


def test_full_and_the_device_copy() -> None:
    slots = SlotMap(num_experts=3, capacity=3, device=torch.device("cpu"))
    assert not slots.full and slots.device_map.tolist() == [-1, -1, -1]
    for slot, expert in enumerate((2, 0, 1)):
        slots.install(slot, expert)
    assert slots.full and slots.device_map.tolist() == [-1, -1, -1]  # only publish copies
    slots.publish()
    assert slots.device_map.tolist() == [1, 2, 0]


@pytest.mark.parametrize("eviction", ["importance", "lru", "lfu"])
def test_placing_on_the_device_makes_the_hosts_decisions(eviction: str) -> None:
    """``ExpertCache.place`` (the host-free decode step's loads, device work only) picks the victims that the host's
    ``loads`` picks, and the host that installs its log's rows ends with the device's maps."""
    from expertswap.engine.moe.expert_cache import ExpertCache

    rng = random.Random(3)
    host, device = (ExpertCache(12, 3, 5, torch.device("cpu"), eviction) for _ in range(2))
    for cache in (host, device):
        for slot, expert in enumerate([0, 1, 2]):  # two empty slots to start with
            cache.slots.install(slot, expert)
        cache.slots.publish()
        cache.norms.copy_(torch.linspace(1.0, 2.0, 12))
    for _ in range(300):
        index = torch.tensor([rng.sample(range(12), 3)])
        weights = torch.rand(1, 3)
        for cache in (host, device):
            cache.observe(index, weights)
        loads = host.loads(sorted(index[0].tolist()))
        evicted = {slot: host.slots.install(slot, expert) for expert, slot in loads}
        host.slots.publish()
        log = torch.empty(3, 3, dtype=torch.long)
        fill = device.place(index, log).tolist()
        rows = log.tolist()
        assert fill == [dict(loads).get(e, -1) for e in index[0].tolist()]  # in routing order
        assert [(e, s, o) for e, s, o in rows if e >= 0] == [(e, s, evicted[s]) for e, s in loads]
        assert all(row == [-1, -1, -1] for row in rows if row[0] < 0)
        assert device.slots.device_map.tolist() == host.slots.device_map.tolist()
        assert device.slots.device_slots.tolist() == host.slots.slot_to_expert
        for expert, slot, _ in (row for row in rows if row[0] >= 0):
            device.slots.install(slot, expert)
        _check(device.slots)
