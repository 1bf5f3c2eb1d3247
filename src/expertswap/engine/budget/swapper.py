"""The background swapper: keeps each committee's most important experts resident.

Reading experts (disk or RAM tier) happens outside the step lock; only the copies into the slots
are done under it, between tokens, one layer's few swaps as one batch, so generation waits at most
for that batch. On CUDA the copies run on the copier's own stream from pinned memory. Under the
policies that load their own misses it only fills the slots a budget raise leaves empty
(``_swaps_pay``); budget requests are settled on every wake regardless.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from expertswap.engine.budget.controller import BudgetController
from expertswap.engine.moe.committee import Committee, Swap
from expertswap.engine.moe.copier import Copier
from expertswap.engine.moe.runtime import Runtime
from expertswap.engine.weights.store import ExpertStore

SWAPS_PER_LAYER = 2  # experts swapped in per layer and round, at most


class Swapper:
    """A daemon thread woken (``Runtime.swaps_due``) after every token and every budget change; ``start`` starts it."""

    def __init__(
        self, committees: Sequence[Committee], store: ExpertStore, runtime: Runtime, copier: Copier,
        budget: BudgetController, swaps_per_layer: int = SWAPS_PER_LAYER,
    ) -> None:
        self.committees = committees
        self.budget = budget  # settled first, on every wake: a request the step lock kept from landing
        self.store = store
        self.runtime = runtime
        self.copier = copier
        self.swaps_per_layer = swaps_per_layer
        self.enabled = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expertswap-swapper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.runtime.swaps_due.set()
        if self._thread.is_alive():
            self._thread.join()

    def run_once(self, grow_only: bool = False) -> int:
        """One round over every layer, each layer's swaps as one batch; returns the number applied.

        ``grow_only``: fill empty slots (after a budget raise) but evict nothing for a better expert.
        """
        done = 0
        for committee in self.committees:
            if self._stop.is_set():
                break
            if grow_only and not committee.slots.empty_slots:  # woken every token: no lock taken for nothing
                continue
            with self.runtime.lock:
                plan, version = committee.cache.plan_swaps(self.swaps_per_layer, evict=not grow_only), committee.version
            if not plan:
                continue
            start = time.perf_counter()
            staged = [(victim, Swap(expert, slot, self.copier.stage(self.store.read(committee.layer, expert), n),
                                    "grow" if victim < 0 else "prefetch"))
                      for n, (expert, slot, victim) in enumerate(plan)]
            with self.runtime.lock:
                if committee.version != version:
                    continue
                batch = [swap for victim, swap in staged if committee.slots.slot_to_expert[swap.slot] == victim
                         and swap.expert not in committee.resident_experts]
                committee.apply_swaps(batch, start, background=True)
            done += len(batch)
        self.runtime.counters.background_swaps += done
        return done

    def _swaps_pay(self) -> bool:
        """Whether evicting for a more important expert earns its loads: only for the policies that never load while
        decoding (substitute, lowbit, cpu), where nothing else brings their missing experts in. Under exact or
        skip a miss loads itself. There the swaps moved 32-43% more bytes for 0.2-1.7 points of hit rate on the
        default model (benchmarks/results/replay-default-*.md) and lowered it on 12 of 42 real traces; on the CPU
        they cost 3-13% of decode speed, and on the GPU their planning (the ranks read back layer by layer, under
        the step lock) halved the host-free step's speed at 75% (Granite shape, H200). Filling the empty slots a
        budget raise made always pays: nothing is evicted."""
        return not self.runtime.policy.loads_on_miss

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.runtime.swaps_due.wait(timeout=0.5)
            self.runtime.swaps_due.clear()
            self.budget.settle()
            if self.enabled and not self.runtime.pinned and not self._stop.is_set():
                grow_only = not self._swaps_pay()
                while self.run_once(grow_only) and not self.runtime.swaps_due.is_set() and not self._stop.is_set():
                    pass
