"""The live committee: budgets that move mid-reply, background swaps, telemetry that adds up."""

from __future__ import annotations

import itertools
import random
import threading
import time

import pytest
import torch

from expertswap.engine import Engine, reporter
from expertswap.engine.observe.memory import current_rss_bytes
from expertswap.protocol import BudgetError, BudgetTooSmallError, Event, PolicyError, SamplingSettings

PROMPT = "A class definition is an executable statement; the inheritance list"
MiB = 2**20


def _reference_tokens(ref, ids: list[int], n: int) -> list[int]:
    return ref.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()


def _slot_bytes(engine: Engine) -> int:
    tensors = [
        t
        for c in engine.committees
        for t in [*c.inner.parameters(), *(w for slot in getattr(c.storage, "slots", []) for w in slot.values())]
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def _run_schedule(engine: Engine, ids: list[int], n: int, schedule: dict[int, int | str],
                  rounds: bool = False) -> list[int]:
    """Generate, calling set_budget after the given token counts; check bytes against the budget in force.

    ``rounds``: a full swapper round between tokens too, run here (under exact on the CPU the thread
    only fills empty slots).
    """
    tokens = []
    for token in engine.generate(ids, SamplingSettings(max_new_tokens=n)):
        tokens.append(token)
        assert _slot_bytes(engine) <= engine.budget_bytes
        if len(tokens) in schedule:
            engine.set_budget(schedule[len(tokens)])
        if rounds:
            engine.swapper.run_once()
    return tokens


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _replay_and_check(events: list[Event], expert_bytes: dict[int, int]) -> int:
    """Replaying swaps from each snapshot must give the next one; returns the number of snapshots checked."""
    state: dict[int, set[int]] | None = None
    budget = None
    checked = 0
    asked: list[int] = []
    for event in events:
        if event.type == "residency":
            snapshot = {layer: set(experts) for layer, experts in event.resident.items()}
            if state is not None:
                assert snapshot == state, "swap events do not add up to the next snapshot"
                checked += 1
            state = snapshot
            if budget is not None:
                used = sum(len(experts) * expert_bytes[layer] for layer, experts in snapshot.items())
                assert used <= budget
        elif event.type == "swap" and state is not None:
            if event.expert_out >= 0:
                assert event.expert_out in state[event.layer]
                state[event.layer].discard(event.expert_out)
            if event.expert_in >= 0:
                assert event.expert_in not in state[event.layer]
                state[event.layer].add(event.expert_in)
        elif event.type == "budget":
            if event.applied:
                budget = event.new_bytes
                assert event.new_bytes in asked, "applied a budget nobody asked for"
                asked = asked[asked.index(event.new_bytes) + 1:]
            else:
                asked.append(event.new_bytes)
    assert not asked, f"budget changes never applied: {asked}"
    return checked


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"])
@pytest.mark.parametrize("rounds", [False, True])
def test_exact_with_shrinking_and_growing_budget(tiny_model, reference, family: str, rounds: bool,
                                                 monkeypatch) -> None:
    monkeypatch.setattr(reporter, "EMIT_S", 0.0)  # a snapshot every token: each one is checked against the swaps
    folder = tiny_model(family)
    with Engine.load(folder, budget="100%") as engine:
        events = engine.subscribe()
        engine.telemetry.emit(engine.residency())
        ids = engine.encode(PROMPT)
        minimum = engine.minimum_budget_bytes
        schedule = {4: "30%", 8: "80%", 12: minimum, 16: "55%", 20: "100%"}
        tokens = _run_schedule(engine, ids, 24, schedule, rounds)
        assert tokens == _reference_tokens(reference(folder), ids, 24)
        capacities = [c.capacity for c in engine.committees]
        assert capacities == [c.num_experts for c in engine.committees], "back at 100% every expert has a slot"
        expert_bytes = {c.layer: c.spec.expert_bytes for c in engine.committees}
        log = events.drain()
    assert _replay_and_check(log, expert_bytes) >= 20
    assert sum(1 for e in log if e.type == "budget" and e.applied) == len(schedule)
    assert any(e.type == "swap" and e.reason == "shrink" for e in log)
    if rounds:
        assert any(e.type == "swap" and e.reason in ("grow", "prefetch") for e in log)
    else:  # the thread alone: it never evicts for importance under exact on the CPU
        assert not any(e.type == "swap" and e.reason == "prefetch" for e in log)


def test_budget_change_applies_before_the_next_token(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=False) as engine:
        stream = engine.generate(engine.encode(PROMPT), SamplingSettings(max_new_tokens=6))
        next(stream)
        with engine.runtime.lock:  # as if a step were running: the GUI thread's call must not block
            caller = threading.Thread(target=engine.set_budget, args=("25%",))
            caller.start()
            caller.join(timeout=10)
            assert not caller.is_alive()
            assert engine.budget_bytes == engine.total_expert_bytes, "a running step is never resized"
        next(stream)
        assert engine.budget_bytes == engine.total_expert_bytes // 4
        assert _slot_bytes(engine) <= engine.budget_bytes
        stream.close()
        with engine.runtime.lock:  # the cancelled reply's last step, if it is still running, ends first
            pass
        engine.set_budget("50%")  # idle engine: applied at once
        assert engine.budget_bytes == engine.total_expert_bytes // 2


@pytest.mark.parametrize("swapper", [True, False])
def test_a_budget_asked_while_the_lock_is_busy_lands_with_no_reply_after_it(tiny_model, swapper: bool) -> None:
    """The request found the step lock held (a residency snapshot, a swap batch) and no token follows."""
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=swapper) as engine:
        with engine.runtime.lock:  # held here, so the call from another thread only records the request
            caller = threading.Thread(target=engine.set_budget, args=("25%",))
            caller.start()
            caller.join(timeout=10)
            assert not caller.is_alive() and engine.budget_bytes == engine.total_expert_bytes
        _wait_for(lambda: engine.budget_bytes == engine.total_expert_bytes // 4,
                  "the idle engine kept the old budget and its memory")
        assert _slot_bytes(engine) <= engine.budget_bytes


def test_budget_below_minimum_is_refused_and_nothing_changes(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="50%") as engine:
        before = [c.capacity for c in engine.committees]
        with pytest.raises(BudgetTooSmallError):
            engine.set_budget(engine.minimum_budget_bytes - 1)
        assert [c.capacity for c in engine.committees] == before


def test_stress_500_budget_changes_from_another_thread(tiny_model, reference) -> None:
    folder = tiny_model("olmoe")
    with Engine.load(folder, budget="50%") as engine:
        ids = engine.encode(PROMPT)
        list(engine.generate(ids, SamplingSettings(max_new_tokens=4)))  # warm up allocator and caches
        rss_before = current_rss_bytes()
        low, high = engine.minimum_budget_bytes, engine.total_expert_bytes
        rng = random.Random(1)
        errors: list[BaseException] = []
        calls = 0

        def hammer() -> None:
            nonlocal calls
            try:
                while calls < 500:
                    engine.set_budget(rng.randint(low, high))
                    calls += 1
            except BaseException as exc:  # reported to the test thread
                errors.append(exc)

        thread = threading.Thread(target=hammer)
        thread.start()
        tokens = []
        for token in engine.generate(ids, SamplingSettings(max_new_tokens=48)):
            tokens.append(token)
            assert _slot_bytes(engine) <= engine.budget_bytes
        thread.join(timeout=120)
        assert not thread.is_alive(), "deadlock: set_budget never returned"
        assert not errors, errors
        assert calls == 500
        assert tokens == _reference_tokens(reference(folder), ids, 48)
        engine.set_budget("50%")
        assert _slot_bytes(engine) <= engine.budget_bytes
        # allocator noise stays far under 64 MiB; keeping one committee's slots per change would not
        leak_per_change = engine.resident_expert_bytes()
        assert 500 * leak_per_change > 64 * MiB, "the bound must catch a leak of one committee per change"
        assert current_rss_bytes() - rss_before < 64 * MiB


def test_skip_threshold_zero_is_exact_and_high_threshold_computes_less(tiny_model, reference) -> None:
    folder = tiny_model("mixtral")
    ids = None
    results = {}
    for policy, threshold in (("exact", 0.0), ("skip", 0.0), ("skip", 0.45)):
        with Engine.load(folder, budget="50%", policy=policy, skip_threshold=threshold, swapper=False) as engine:
            ids = ids or engine.encode(PROMPT)
            tokens = list(engine.generate(ids, SamplingSettings(max_new_tokens=16)))
            results[(policy, threshold)] = (tokens, engine.stats())
    exact_tokens, exact_stats = results[("exact", 0.0)]
    zero_tokens, zero_stats = results[("skip", 0.0)]
    _high_tokens, high_stats = results[("skip", 0.45)]
    assert zero_tokens == exact_tokens == _reference_tokens(reference(folder), ids, 16)
    assert zero_stats.skipped == 0
    assert high_stats.skipped > 0
    computed = lambda s: s.hits + s.misses  # noqa: E731 - routings that reached an expert
    assert computed(high_stats) + high_stats.skipped == computed(exact_stats)
    assert computed(high_stats) < computed(exact_stats)


def test_swapper_never_swaps_while_a_layer_runs(tiny_model, monkeypatch) -> None:
    from expertswap.engine.moe import committee as committee_module

    seen_active: list[int] = []
    original = committee_module.Committee.apply_swaps

    def spy(self, swaps, start, background=False):  # records what was running when a batch was copied in
        if threading.current_thread().name == "expertswap-swapper":
            seen_active.append(self.runtime.active_layers)
        return original(self, swaps, start, background)

    monkeypatch.setattr(committee_module.Committee, "apply_swaps", spy)
    with Engine.load(tiny_model("qwen3_moe"), budget="50%", policy="substitute") as engine:
        ids = engine.encode(PROMPT * 2)
        for _ in range(3):
            list(engine.generate(ids, SamplingSettings(max_new_tokens=24)))
        assert engine.stats().background_swaps > 0
        assert engine.runtime.swaps_during_forward == 0
    assert seen_active and set(seen_active) == {0}


def test_on_the_cpu_the_swapper_only_grows_while_misses_load_themselves(tiny_model) -> None:
    """Under exact a miss is loaded anyway; evicting for importance in the background would only compete
    with the step for the cores. Empty slots after a budget raise are still filled. Switched live to
    substitute, which never loads while decoding, the importance swaps resume."""
    with Engine.load(tiny_model("qwen3_moe"), budget="50%", policy="exact") as engine:
        ids = engine.encode(PROMPT * 2)
        for _ in range(3):
            list(engine.generate(ids, SamplingSettings(max_new_tokens=24)))
        time.sleep(0.6)  # past the thread's idle wake
        stats = engine.stats()
        assert stats.misses > 0 and stats.background_swaps == 0
        engine.set_budget("100%")
        full = sum(c.num_experts for c in engine.committees)
        _wait_for(lambda: sum(len(c.resident_experts) for c in engine.committees) == full,
                  "the raised budget's slots stayed empty")
        engine.set_budget("50%")
        engine.set_policy("substitute")
        grown = engine.stats().background_swaps
        list(engine.generate(ids, SamplingSettings(max_new_tokens=24)))
        _wait_for(lambda: engine.stats().background_swaps > grown, "the swapper did not resume under substitute")


def test_background_swapper_raises_the_hit_rate(tiny_model) -> None:
    rates = {}
    for swapper in (False, True):
        with Engine.load(tiny_model("qwen3_moe"), budget="50%", policy="substitute", swapper=swapper) as engine:
            ids = engine.encode(PROMPT)
            for _ in range(3):
                list(engine.generate(ids, SamplingSettings(max_new_tokens=24)))
                if swapper:
                    engine.swapper.run_once()  # deterministic: at least one full round between replies
            stats = engine.stats()
            rates[swapper] = stats.hit_rate
            assert (stats.background_swaps > 0) == swapper
    assert rates[True] > rates[False]


def test_follow_free_memory(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="100%", swapper=False) as engine:
        events = engine.subscribe()
        total = engine.total_expert_bytes
        free = {"bytes": 10 * total}
        engine.watcher.free_bytes = lambda: free["bytes"]  # type: ignore[method-assign]
        engine.follow_free_memory(True, margin_bytes=total // 8)
        engine.watcher.tick()
        assert engine.budget_bytes == total, "plenty free: keep everything"
        free["bytes"] = 0  # another program took the memory
        engine.watcher.tick()
        assert engine.budget_bytes <= total - total // 8
        assert _slot_bytes(engine) <= engine.budget_bytes
        shrunk = engine.budget_bytes
        free["bytes"] = 10 * total  # and gave it back
        engine.watcher.tick()
        assert engine.budget_bytes == total > shrunk
        engine.follow_free_memory(False)
        free["bytes"] = 0
        engine.watcher.tick()
        assert engine.budget_bytes == total
        types = {e.type for e in events.drain()}
    assert {"memory", "budget", "residency"} <= types


def test_memory_samples_are_emitted(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="50%") as engine:
        events = engine.subscribe()
        engine.watcher.tick()
        samples = [e for e in events.drain() if e.type == "memory"]
    assert samples and samples[0].rss_bytes > 0 and samples[0].available_ram_bytes > 0
    assert samples[0].budget_bytes == engine.budget_bytes
    assert samples[0].resident_expert_bytes <= samples[0].budget_bytes


def test_lru_eviction_replaces_the_least_recently_routed_expert(tiny_model, reference) -> None:
    """The on-demand LRU baseline: exact tokens, and a miss evicts the expert unused for longest."""
    from expertswap.engine import Engine
    from expertswap.protocol import SamplingSettings

    folder = tiny_model("qwen3_moe")
    with Engine.load(folder, budget="25%", policy="exact", swapper=False, eviction="lru") as lru, \
            Engine.load(folder, budget="100%", swapper=False) as full:
        ids = lru.encode("Exceptions are raised when an error is detected")
        settings = SamplingSettings(max_new_tokens=12)
        assert list(lru.generate(ids, settings)) == list(full.generate(ids, settings))
        committee = lru.committees[0]
        resident = committee.resident_experts
        assert int(committee.cache.last_used.max()) > 0  # routings were stamped while generating
        committee.cache.last_used[:] = 100
        committee.cache.last_used[resident[1]] = 7  # the stalest resident expert
        slot_of_stale = committee.slots.slot_to_expert.index(resident[1])
        assert committee.cache.victims(set())[0] == slot_of_stale
        committee.cache.last_used[resident[1]] = 200
        assert committee.cache.victims(set())[0] != slot_of_stale
        assert slot_of_stale not in committee.cache.victims({resident[1]})  # a wanted expert is never a victim


def test_pinned_committee_stays_put_and_bad_requests_are_refused(tiny_model) -> None:
    with Engine.load(tiny_model("qwen3_moe"), budget="25%", policy="substitute") as engine:
        layers = [c.layer for c in engine.committees]
        engine.pin_committee({layer: [3, 6] for layer in layers})
        before = engine.stats().expert_loads
        list(engine.generate(engine.encode("def add(a, b):"), SamplingSettings(max_new_tokens=8)))
        engine.score(engine.encode("return a + b"))
        assert all(engine.residency().resident[layer] == [3, 6] for layer in layers)
        assert engine.stats().expert_loads == before and engine.stats().substituted > 0  # prompt included
        with pytest.raises(BudgetError):
            engine.pin_committee({layers[0]: [0, 1, 2]})
        with pytest.raises(ValueError):
            engine.pin_committee({layers[0]: [99]})
        with pytest.raises(PolicyError):
            engine.set_policy("exact")
        assert engine.residency().resident[layers[0]] == [3, 6]  # refused requests change nothing
        engine.pin_committee(None)
        engine.set_policy("exact")
        list(engine.generate(engine.encode("def add(a, b):"), SamplingSettings(max_new_tokens=4)))
        assert engine.stats().expert_loads > before  # released: misses load again


def test_batched_swaps_keep_maps_and_norms_true(tiny_model) -> None:
    """After a reply of batched misses and background swaps, the device map mirrors the slots and every
    learnt |expert| is the norm of that expert's own weights."""
    engine = Engine.load(tiny_model("qwen3_moe"), budget="25%")
    list(engine.generate(engine.encode(PROMPT), SamplingSettings(max_new_tokens=12)))
    engine.swapper.run_once()
    assert engine.runtime.counters.loads > 0
    for c in engine.committees:
        expected = torch.full((c.num_experts,), -1, dtype=torch.long)
        for slot, expert in enumerate(c.slots.slot_to_expert):
            if expert >= 0:
                expected[expert] = slot
                held = c.storage.read(slot)
                for name, tensor in engine.store.read(c.layer, expert).items():
                    assert torch.equal(held[name], tensor)
        assert torch.equal(c.slots.device_map.cpu(), expected)
        known = [e for e in range(c.num_experts) if not torch.isnan(c.cache.norms[e])]
        assert len(known) > c.capacity  # experts that came and went keep their norm
        for e in known:
            weights = engine.store.read(c.layer, e).values()
            true = torch.sqrt(sum(t.float().square().sum() for t in weights))
            torch.testing.assert_close(c.cache.norms[e], true, rtol=1e-5, atol=0)
    engine.close()


def test_a_listener_hears_a_replys_stats_and_committees_at_most_every_frame_and_at_its_ends(tiny_model) -> None:
    """A snapshot of every layer on every token cost the decoder a fifth of its speed with the window open."""
    with Engine.load(tiny_model("qwen3_moe"), budget="50%") as engine:
        events = engine.subscribe()
        events.drain()
        start = time.monotonic()
        tokens = list(engine.generate(engine.encode(PROMPT), SamplingSettings(max_new_tokens=60)))
        elapsed = time.monotonic() - start
        log = events.drain()
    stats = [e for e in log if e.type == "token"]
    snapshots = [e for e in log if e.type == "residency"]
    assert stats[0].tokens == 1 and stats[-1].tokens == len(tokens)  # the first and the last token are told
    assert len(stats) == len(snapshots) <= 2 + elapsed / reporter.EMIT_S
    assert all(b.t - a.t >= reporter.EMIT_S * 0.9 for a, b in itertools.pairwise(stats[:-1]))
