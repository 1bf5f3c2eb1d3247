"""The budget in force and the budget asked for.

Any thread may ask (the GUI's slider, the free-memory watcher, an out-of-memory step); a request is
only recorded, and applied under the step lock between tokens (or at once when no step runs), so
a forward never sees its committees resized.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from expertswap.engine.budget.demand import effective_experts
from expertswap.engine.moe.committee import Committee
from expertswap.engine.moe.residency import residency, resident_bytes
from expertswap.engine.moe.runtime import Runtime
from expertswap.protocol.budget import parse_budget
from expertswap.protocol.errors import BudgetTooSmallError
from expertswap.protocol.events import BudgetChange
from expertswap.protocol.plan import minimum_bytes, plan_capacities


class BudgetController:
    """Owns ``budget_bytes``; resizes the committees to a requested budget at the next safe moment."""

    def __init__(self, committees: Sequence[Committee], runtime: Runtime, budget_bytes: int, total_expert_bytes: int,
                 device: torch.device) -> None:
        self.committees = committees
        self.runtime = runtime
        self.budget_bytes = budget_bytes
        self.total_expert_bytes = total_expert_bytes
        self.device = device
        self.follow_margin = self.default_margin()
        self._pending: tuple[int, str] | None = None  # bytes and why
        self._lock = threading.Lock()

    @property
    def minimum_bytes(self) -> int:
        return minimum_bytes([c.shape for c in self.committees])

    @property
    def next_bytes(self) -> int:
        """The budget the next step runs under: a request still pending, else the one in force."""
        with self._lock:
            return self._pending[0] if self._pending is not None else self.budget_bytes

    def request(self, budget: str | int, reason: str = "user") -> int:
        """Record a new budget (from any thread); applied now if no step runs, else before the next one."""
        new = parse_budget(budget, self.total_expert_bytes)
        if new < self.minimum_bytes:
            raise BudgetTooSmallError(new, self.minimum_bytes)
        with self._lock:
            self._pending = new, reason
        self.runtime.telemetry.emit(BudgetChange(old_bytes=self.budget_bytes, new_bytes=new, applied=False,
                                                 capacities=[c.capacity for c in self.committees], reason=reason))
        if self.runtime.lock.acquire(blocking=False):  # idle: apply now; else the next step applies it
            try:
                self.apply_pending()
            finally:
                self.runtime.lock.release()
        self.runtime.swaps_due.set()  # the swapper fills or trims the committees, and settles a request left pending
        return new

    def settle(self) -> None:
        """Apply a request that found the step lock busy (a step, a snapshot, a swap batch) and no step followed.

        Called from the swapper's thread, which may wait for the lock; without it an idle engine would keep
        the old committees, and their memory, until the next reply.
        """
        while self._pending is not None:
            try:
                with self.runtime.lock:
                    self.apply_pending()
            except (torch.OutOfMemoryError, MemoryError) as exc:  # growing found no room: as a step does
                if not self.shrink_after_oom(exc):
                    return

    def apply_pending(self, finish: Callable[[], None] | None = None) -> None:
        """Resize every committee to the pending budget (the caller holds the step lock), after ``finish``: the
        decode step still in flight, which the resize must find settled."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        if finish is not None:
            finish()
        new, reason = pending
        demand = [effective_experts(c.cache.scores(), c.top_k) for c in self.committees]
        capacities = plan_capacities(new, [c.shape for c in self.committees], demand)
        # shrink first so that the transient copies of a resize never stack up
        for committee, capacity in sorted(
            zip(self.committees, capacities, strict=True), key=lambda p: p[1] - p[0].capacity
        ):
            committee.resize(capacity)
        old, self.budget_bytes = self.budget_bytes, new
        self.runtime.telemetry.emit(BudgetChange(old_bytes=old, new_bytes=new, applied=True, capacities=capacities,
                                                 reason=reason))
        self.runtime.telemetry.emit(residency(self.committees))  # listeners see the committees it left

    @property
    def resident_bytes(self) -> int:
        """Bytes the committees hold now (a resize lands between tokens, so this may lag ``budget_bytes``)."""
        return resident_bytes(self.committees)

    def follow_target(self, free_bytes: int) -> int:
        """The budget following free memory aims at: what is resident plus what is free, less the margin."""
        target = self.resident_bytes + free_bytes - self.follow_margin
        return max(self.minimum_bytes, min(self.total_expert_bytes, target))

    def follow(self, free_bytes: int) -> None:
        """Track free memory: move to ``follow_target`` once it is an expert or more away."""
        target = self.follow_target(free_bytes)
        step = max(c.spec.expert_bytes for c in self.committees)
        if abs(target - self.budget_bytes) >= step:
            self.request(target, reason="follow")

    def shrink_after_oom(self, _error: BaseException) -> bool:
        """A step ran out of memory: halve the headroom above the minimum and let it retry; False at the minimum."""
        minimum = self.minimum_bytes
        with self._lock:
            current = self._pending[0] if self._pending is not None else self.budget_bytes
        if current <= minimum:
            return False
        self.request(minimum + (current - minimum) // 2, reason="oom")
        # no gc.collect() here: run on the generation thread, it fired finalizers of GUI objects while
        # the GUI thread painted, and the two deadlocked (tests/test_mid_reply.py); tensors are freed
        # by reference counting, and the resize drops its slots before this returns
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed slots back before the retry allocates
        return True

    def default_margin(self) -> int:
        return max(512 * 2**20, self.total_expert_bytes // 10)
